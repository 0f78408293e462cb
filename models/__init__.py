"""The ViT / ViT-MAE model pieces used by the three stages: the method in models/vit_mae.py, where a model name
leads in models/hub.py, checkpoint and preprocessing I/O in models/checkpoints.py."""
from models.checkpoints import (Preprocessing, has_checkpoint, load_encoder, load_encoder_state, preprocessing_of,
                                read_release_checkpoint, rename_v4_keys, save_model)
from models.hub import TINY_NAME
from models.vit_mae import (SINCOS_TABLES, MAEWithFeature, build_classifier, build_encoder, cls_feature, load_mae,
                            mae_loss, sincos_2d_table)

__all__ = ["SINCOS_TABLES", "TINY_NAME", "MAEWithFeature", "Preprocessing", "build_classifier", "build_encoder",
           "cls_feature", "has_checkpoint", "load_encoder", "load_encoder_state", "load_mae", "mae_loss",
           "preprocessing_of", "read_release_checkpoint", "rename_v4_keys", "save_model", "sincos_2d_table"]
