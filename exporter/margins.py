"""Margin-based classification heads for face recognition, and their loss.

One layer, :class:`MarginHead`, covers the common heads by its parameters, all on the cosine between
the L2-normalised embedding and L2-normalised class centres ``W``:

* ArcFace (Deng et al. 2019): target logit ``s * cos(theta + m)``; ``angular_margin=m``.
* sub-center ArcFace: ``subcenters=K`` centres per class, the class cosine is the max over them.
* CosFace (Wang et al. 2018): target logit ``s * (cos(theta) - m)``; ``cosine_margin=m``.
* normalised softmax (NormFace): no margin, ``s * cos(theta)``.

Called as ``head([embeddings, labels])`` it returns training logits (margin on the target class);
called as ``head(embeddings)`` it returns the plain scaled cosines (for monitoring or inference).
The loss is ordinary sparse softmax cross-entropy on those logits (:class:`MarginLoss`), so the pair
plugs into ``model.compile(loss=MarginLoss())`` and ``fit()`` or into a ``tf.GradientTape`` loop.

Numerics: cosines are clipped to ``[-1 + eps, 1 - eps]`` before the square root, so neither the
value nor its gradient is NaN/inf at cos = +-1 (the arcface-tf2 original is not clipped).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

# Far enough from 1 that 1 - cos^2 stays representable in float32 and d sqrt / dx stays finite.
COS_EPS = 1e-6

# a backend tensor (or anything keras.ops takes): Keras ships no types to name it by
Tensor = Any


def arcface_target_logit(cos: Tensor, margin: float, easy_margin: bool = False) -> Tensor:
    """cos(theta + m) for the target class, with the fallback where theta + m would pass pi.

    cos(theta + m) is not monotonic in theta once theta + m > pi, which would *reward* moving away
    from the class centre; there the standard (non-easy) insightface form switches to
    ``cos(theta) - sin(pi - m) * m`` (a CosFace-like penalty), which keeps the target logit
    decreasing in theta (it steps down at the switch, it is not continuous there). ``easy_margin``
    instead applies the margin only where cos(theta) > 0.
    """
    cos = ops.clip(cos, -1.0 + COS_EPS, 1.0 - COS_EPS)
    sin = ops.sqrt(ops.maximum(1.0 - cos * cos, 0.0))
    cos_theta_plus_m = cos * math.cos(margin) - sin * math.sin(margin)
    if easy_margin:
        return ops.where(cos > 0.0, cos_theta_plus_m, cos)
    threshold = math.cos(math.pi - margin)
    fallback = cos - math.sin(math.pi - margin) * margin
    return ops.where(cos > threshold, cos_theta_plus_m, fallback)


@keras.saving.register_keras_serializable(package="exporter")
class MarginHead(keras.layers.Layer):
    """Class centres and margin logits; see the module docstring for the heads it covers.

    Args:
        num_classes: identities in the training set.
        scale: logit scale ``s`` (64 for large sets, 30-32 for small ones).
        angular_margin: ArcFace margin ``m`` in radians (0 disables it).
        cosine_margin: CosFace margin subtracted from the target cosine (0 disables it).
        subcenters: centres per class (sub-center ArcFace: 3).
        easy_margin: ArcFace margin only where cos > 0 (instead of the theta + m > pi fallback).
        weight_decay: L2 on the centres, as arcface-tf2's heads.
    """

    def __init__(self, num_classes: int, scale: float = 64.0, angular_margin: float = 0.5,
                 cosine_margin: float = 0.0, subcenters: int = 1, easy_margin: bool = False,
                 weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or subcenters < 1:
            raise ValueError("num_classes and subcenters must be >= 1")
        if not 0.0 <= angular_margin < math.pi / 2:
            raise ValueError("angular_margin must lie in [0, pi/2)")
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.angular_margin = float(angular_margin)
        self.cosine_margin = float(cosine_margin)
        self.subcenters = int(subcenters)
        self.easy_margin = bool(easy_margin)
        self.weight_decay = float(weight_decay)

    def build(self, input_shape: tuple | list) -> None:
        embedding_shape = input_shape[0] if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else input_shape
        self.centres = self.add_weight(
            name="weights",  # arcface-tf2's ArcMarginPenaltyLogists calls its variable this
            shape=(int(embedding_shape[-1]), self.num_classes * self.subcenters),
            initializer="glorot_uniform",
            regularizer=keras.regularizers.L2(self.weight_decay) if self.weight_decay else None,
        )

    def cosines(self, embeddings: Tensor) -> Tensor:
        """N x num_classes cosines (max over sub-centres)."""
        x = embeddings / ops.maximum(ops.norm(embeddings, axis=1, keepdims=True), 1e-12)
        w = self.centres / ops.maximum(ops.norm(self.centres, axis=0, keepdims=True), 1e-12)
        cos = ops.matmul(ops.cast(x, w.dtype), w)
        if self.subcenters > 1:
            cos = ops.max(ops.reshape(cos, (-1, self.num_classes, self.subcenters)), axis=2)
        return cos

    def margin_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        """Scaled logits with the margin applied to each row's target class only."""
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        one_hot = ops.one_hot(labels, self.num_classes, dtype=cos.dtype)
        target = cos
        if self.angular_margin > 0:
            target = arcface_target_logit(cos, self.angular_margin, self.easy_margin)
        if self.cosine_margin > 0:
            target = target - self.cosine_margin
        return self.scale * (one_hot * target + (1.0 - one_hot) * cos)

    def call(self, inputs: Tensor | list | tuple) -> Tensor:
        if isinstance(inputs, (list, tuple)):
            embeddings, labels = inputs
            return self.margin_logits(self.cosines(embeddings), labels)
        return self.scale * self.cosines(inputs)

    def compute_output_shape(self, input_shape: tuple | list) -> tuple:
        shape = input_shape[0] if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else input_shape
        return (shape[0], self.num_classes)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes, "scale": self.scale,
                "angular_margin": self.angular_margin, "cosine_margin": self.cosine_margin,
                "subcenters": self.subcenters, "easy_margin": self.easy_margin,
                "weight_decay": self.weight_decay}


def margin_head(kind: str, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                subcenters: int = 3, easy_margin: bool = False, weight_decay: float = 0.0,
                name: str = "margin_head") -> MarginHead:
    """The head by name: ``arcface``, ``subcenter``, ``cosface`` or ``softmax``."""
    params: dict[str, dict[str, Any]] = {
        "arcface": dict(angular_margin=margin, subcenters=1),
        "subcenter": dict(angular_margin=margin, subcenters=max(subcenters, 2)),
        "cosface": dict(angular_margin=0.0, cosine_margin=margin, subcenters=1),
        "softmax": dict(angular_margin=0.0, subcenters=1),
    }
    if kind not in params:
        raise ValueError(f"unknown head {kind!r}; expected one of {', '.join(params)}")
    return MarginHead(num_classes, scale=scale, easy_margin=easy_margin, weight_decay=weight_decay,
                      name=name, **params[kind])


@keras.saving.register_keras_serializable(package="exporter")
class MarginLoss(keras.losses.Loss):
    """Softmax cross-entropy on :class:`MarginHead` logits (``y_true``: integer labels)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "margin_loss", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        if self.label_smoothing:
            one_hot = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
            return keras.losses.categorical_crossentropy(
                one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing)
        return keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
