"""The embedding model: a Keras application backbone and arcface-tf2's embedding head.

The structure follows the public arcface-tf2 project (input layer ``input_image``, the backbone
nested as one layer, a nested functional ``OutputLayer``), so a checkpoint of that project maps onto
it layer by layer (see :mod:`exporter.checkpoints`). The model returns the raw embedding; callers
L2-normalise it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from .config import TrainConfig
from .margins import MarginHead, margin_head

log = logging.getLogger(__name__)

INPUT_NAME = "input_image"
HEAD_NAME = "OutputLayer"
BACKBONE_BN_MOMENTUM = 0.99


def build_backbone(kind: str, input_size: int = 112, alpha: float = 1.0,
                   imagenet_weights: str | Path | None = None) -> keras.Model:
    """ResNet50 or MobileNetV2 without its top, randomly initialised unless a local weights file is given.

    Never ``weights="imagenet"``: that downloads at run time. A weights file from a Keras
    application cache (``~/.keras/models``) can be passed explicitly instead.
    """
    shape = (input_size, input_size, 3)
    if kind == "ResNet50":
        model = keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape)
    elif kind == "MobileNetV2":
        model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=shape, alpha=alpha)
    else:
        raise ValueError(f"unknown backbone {kind!r}")
    # Keras applications use BN momentum 0.999 (tuned for ImageNet's ~1M steps): after a few thousand
    # steps from scratch the moving statistics are still mostly their initial 0/1, so inference-mode
    # activations saturate ReLU6 and every face gets the same embedding. 0.99 tracks within ~500 steps.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BACKBONE_BN_MOMENTUM
    if imagenet_weights:
        path = Path(imagenet_weights)
        if not path.exists():
            raise FileNotFoundError(f"ImageNet weights {path} not found (they are never downloaded)")
        model.load_weights(str(path), skip_mismatch=False)
        log.info("backbone initialised from %s", path)
    return model


def embedding_head(feature_shape: tuple[int | None, ...], embedding_size: int = 512, dropout: float = 0.5,
                   weight_decay: float = 5e-4, name: str = HEAD_NAME) -> keras.Model:
    """BN -> Dropout -> Flatten -> Dense(embedding_size, L2) -> BN, as a nested functional model.

    Keras 3 BatchNormalization already runs in inference mode when the layer is frozen
    (``trainable=False``), which is what arcface-tf2's BatchNormalization subclass adds in Keras 2.
    """
    features = keras.Input(shape=tuple(feature_shape[1:]))
    x = keras.layers.BatchNormalization()(features)
    x = keras.layers.Dropout(rate=dropout)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(embedding_size,
                           kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(features, x, name=name)


def build_embedding_model(cfg: TrainConfig, imagenet_weights: bool = True) -> keras.Model:
    """Image (normalised, NHWC) -> raw embedding. ``imagenet_weights=False`` when weights come next anyway."""
    inputs = keras.Input(shape=(cfg.input_size, cfg.input_size, 3), name=INPUT_NAME)
    backbone = build_backbone(cfg.backbone, cfg.input_size, cfg.alpha,
                              cfg.imagenet_weights if imagenet_weights else None)
    features = backbone(inputs)
    embeddings = embedding_head(backbone.output.shape, cfg.embedding_size, cfg.dropout, cfg.weight_decay)(features)
    return keras.Model(inputs, embeddings, name=f"arcface_{cfg.backbone.lower()}")


def build_margin_head(cfg: TrainConfig, num_classes: int) -> MarginHead:
    return margin_head(cfg.head, num_classes, scale=cfg.scale, margin=cfg.margin, subcenters=cfg.subcenters,
                       easy_margin=cfg.easy_margin, weight_decay=cfg.weight_decay)


def build_training_model(embedding_model: keras.Model, head: MarginHead) -> keras.Model:
    """(image, label) -> margin logits: the embedding model plus the head, as arcface-tf2's training form."""
    image = keras.Input(shape=embedding_model.input_shape[1:], name=INPUT_NAME)
    label = keras.Input(shape=(), name="label", dtype="int32")
    logits = head([embedding_model(image), label])
    return keras.Model([image, label], logits, name="arcface_train")
