"""Margin head math: known angles, the theta + m > pi fallback, numerics, plug-in use."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.export
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from exporter.margins import MarginHead, MarginLoss, arcface_target_logit, margin_head  # noqa: E402


def unit_at_angle(theta: float, dim: int = 4) -> np.ndarray:
    """A unit vector at angle theta from e0 (in the e0-e1 plane)."""
    v = np.zeros(dim, np.float32)
    v[0], v[1] = math.cos(theta), math.sin(theta)
    return v


def head_with_centres(centres: np.ndarray, **kwargs) -> MarginHead:
    head = MarginHead(num_classes=centres.shape[1] // kwargs.get("subcenters", 1), **kwargs)
    head.build((None, centres.shape[0]))
    head.centres.assign(centres)
    return head


@pytest.mark.parametrize("theta", [0.1, 0.7, 1.2, 2.0])
def test_arcface_logits_for_known_angles(theta):
    s, m = 30.0, 0.5
    centres = np.stack([unit_at_angle(0.0), unit_at_angle(math.pi / 2)], axis=1)  # class 0 along e0, class 1 along e1
    head = head_with_centres(centres, scale=s, angular_margin=m)
    x = unit_at_angle(theta)[None] * 3.7  # length must not matter
    logits = np.asarray(head([x, np.array([0])]))[0]
    assert logits[0] == pytest.approx(s * math.cos(theta + m), abs=1e-4)
    assert logits[1] == pytest.approx(s * math.cos(math.pi / 2 - theta), abs=1e-4)  # non-target: plain cosine
    plain = np.asarray(head(x))[0]  # no labels: no margin
    assert plain[0] == pytest.approx(s * math.cos(theta), abs=1e-4)


def test_fallback_where_theta_plus_margin_passes_pi():
    m = 0.5
    theta = math.pi - 0.2  # theta + m > pi: cos(theta + m) would be increasing again
    cos = tf.constant([math.cos(theta)])
    got = float(arcface_target_logit(cos, m)[0])
    assert got == pytest.approx(math.cos(theta) - math.sin(math.pi - m) * m, abs=1e-5)
    assert got < math.cos(theta)  # still a penalty
    # what the fallback is for: the target logit keeps falling as theta grows, all the way to pi
    # (cos(theta + m) alone would rise again past pi - m and reward moving away from the centre)
    thetas = np.linspace(0.0, math.pi, 2001)
    target = np.asarray(arcface_target_logit(tf.constant(np.cos(thetas), tf.float32), m))
    assert np.all(np.diff(target) <= 1e-6)


def test_easy_margin_leaves_negative_cosines_alone():
    cos = tf.constant([-0.3, 0.4])
    got = np.asarray(arcface_target_logit(cos, 0.5, easy_margin=True))
    assert got[0] == pytest.approx(-0.3, abs=1e-6)
    assert got[1] == pytest.approx(math.cos(math.acos(0.4) + 0.5), abs=1e-5)


@pytest.mark.parametrize("kind", ["arcface", "subcenter", "cosface", "softmax"])
def test_no_nan_at_cos_plus_minus_one_and_finite_gradients(kind):
    centre = unit_at_angle(0.0)
    head = margin_head(kind, num_classes=2, scale=64.0, margin=0.5, subcenters=2)
    head.build((None, 4))
    w = np.tile(np.stack([centre, -centre], axis=1), (1, 1))
    w = np.repeat(w, head.subcenters, axis=1) if head.subcenters > 1 else w
    head.centres.assign(w)
    x = tf.constant(np.stack([centre, -centre]))  # cos = +1 to class 0 and -1 to class 1, and vice versa
    labels = tf.constant([0, 0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = head([x, labels])
        loss = tf.reduce_mean(MarginLoss()(labels, logits))
    grads = tape.gradient(loss, [x, head.centres.value])
    assert np.isfinite(logits.numpy()).all() and np.isfinite(loss.numpy())
    assert all(np.isfinite(g.numpy()).all() for g in grads)


def test_cosface_and_subcenter_shapes():
    cosface = margin_head("cosface", num_classes=5, scale=10.0, margin=0.35)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    labels = np.array([0, 4, 2])
    plain = np.asarray(cosface(x))
    logits = np.asarray(cosface([x, labels]))
    assert logits.shape == (3, 5)
    expected = plain.copy()
    expected[np.arange(3), labels] -= 10.0 * 0.35
    np.testing.assert_allclose(logits, expected, atol=1e-4)

    sub = margin_head("subcenter", num_classes=5, subcenters=3)
    out = sub([x, labels])
    assert tuple(sub.centres.shape) == (8, 15) and tuple(out.shape) == (3, 5)
    # the class cosine is the best of its sub-centres
    w = sub.centres.numpy() / np.linalg.norm(sub.centres.numpy(), axis=0, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(sub(x)) / sub.scale, (xn @ w).reshape(3, 5, 3).max(axis=2), atol=1e-5)


def _toy_data(n=64, classes=4, dim=16):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(classes, dim)) * 3
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels.astype(np.int32)


def test_plug_in_with_fit():
    x, y = _toy_data()
    features = keras.Input((16,))
    label = keras.Input((), dtype="int32")
    embedding = keras.layers.Dense(8)(features)
    model = keras.Model([features, label], MarginHead(4, scale=16.0, angular_margin=0.3)([embedding, label]))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=MarginLoss())
    history = model.fit([x, y], y, epochs=15, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_plug_in_with_gradient_tape():
    x, y = _toy_data()
    embed = keras.layers.Dense(8)
    head = MarginHead(4, scale=16.0, angular_margin=0.3, subcenters=2, weight_decay=1e-4)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    loss_fn = MarginLoss(label_smoothing=0.1)
    losses = []
    for _ in range(30):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, head([embed(x), y]))) + tf.add_n(head.losses)
        variables = embed.trainable_variables + head.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
