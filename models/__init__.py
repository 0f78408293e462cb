"""The ViT / ViT-MAE model pieces used by the three stages (see models/vit_mae.py)."""
from models.vit_mae import (SINCOS_TABLES, TINY_NAME, MAEWithFeature, Preprocessing, build_classifier, cls_feature,
                            has_checkpoint, load_encoder, load_encoder_state, load_mae, mae_loss, preprocessing_of,
                            read_release_checkpoint, rename_v4_keys, save_model, sincos_2d_table)

__all__ = ["SINCOS_TABLES", "TINY_NAME", "MAEWithFeature", "Preprocessing", "build_classifier", "cls_feature",
           "has_checkpoint", "load_encoder", "load_encoder_state", "load_mae", "mae_loss", "preprocessing_of",
           "read_release_checkpoint", "rename_v4_keys", "save_model", "sincos_2d_table"]
