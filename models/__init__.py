"""The ViT / ViT-MAE model pieces used by the three stages (see models/vit_mae.py)."""
from models.vit_mae import (TINY_NAME, MAEWithFeature, build_classifier, cls_feature, has_checkpoint,
                            image_stats, load_encoder, load_encoder_state, load_mae, mae_loss,
                            read_release_checkpoint, rename_v4_keys, save_model)

__all__ = ["TINY_NAME", "MAEWithFeature", "build_classifier", "cls_feature", "has_checkpoint", "image_stats",
           "load_encoder", "load_encoder_state", "load_mae", "mae_loss", "read_release_checkpoint",
           "rename_v4_keys", "save_model"]
