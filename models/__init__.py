"""The model pieces used by the three stages: the method on images in models/vit_mae.py (ViT-MAE, MAE) and on
text in models/roberta_mlm.py (RoBERTa, MLM), where a model name leads in models/hub.py, checkpoint and
preprocessing I/O in models/checkpoints.py."""
from models.checkpoints import (Preprocessing, has_checkpoint, load_encoder, load_encoder_state, preprocessing_of,
                                read_release_checkpoint, rename_v4_keys, save_model)
from models.hub import TEXT_TINY_NAME, TINY_NAME, modality
from models.roberta_mlm import (MAX_LENGTH, MLMObjective, MLMWithFeature, TokenizedSplit, build_text_classifier,
                                first_token_feature, load_mlm, load_or_tokenize, load_tokenizer, mlm_loss, mlm_masks,
                                pad_batch, special_tokens_mask, text_encoder_state, tokenize_texts)
from models.vit_mae import (SINCOS_TABLES, MAEWithFeature, build_classifier, build_encoder, cls_feature, load_mae,
                            mae_loss, sincos_2d_table, start_encoder_state)

__all__ = ["MAX_LENGTH", "SINCOS_TABLES", "TEXT_TINY_NAME", "TINY_NAME", "build_classifier", "build_encoder",
           "build_text_classifier", "cls_feature", "first_token_feature", "has_checkpoint", "load_encoder",
           "load_encoder_state", "load_mae", "load_mlm", "load_or_tokenize", "load_tokenizer", "mae_loss",
           "MAEWithFeature", "mlm_loss", "mlm_masks", "MLMObjective", "MLMWithFeature", "modality", "pad_batch",
           "Preprocessing", "preprocessing_of", "read_release_checkpoint", "rename_v4_keys", "save_model",
           "sincos_2d_table", "special_tokens_mask", "start_encoder_state", "text_encoder_state", "tokenize_texts",
           "TokenizedSplit"]
