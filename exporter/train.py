"""Training: Keras ``fit()`` or a custom ``tf.GradientTape`` loop, same model, data and checkpoints.

Both modes save a ``tf.train.Checkpoint`` (embedding model, head, optimizer, step, epoch) at each
epoch end (and every ``checkpoint_every_steps``), resume from the latest one, log to TensorBoard
under ``<run>/logs`` and finish by writing the run directory described in
:mod:`exporter.checkpoints`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from .backbones import build_embedding_model, build_margin_head, build_training_model
from .checkpoints import CHECKPOINT_DIR, save_run, training_checkpoint
from .config import TrainConfig, save_config
from .data import training_dataset
from .margins import MarginLoss

log = logging.getLogger(__name__)


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int,
                           total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule | float:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.lr_schedule == "cosine":
        warmup = min(warmup, max(total_steps - 1, 0))
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=cfg.learning_rate * 0.01 if warmup else cfg.learning_rate,
            decay_steps=max(total_steps - warmup, 1), alpha=0.001,
            warmup_target=cfg.learning_rate if warmup else None, warmup_steps=warmup)
    if cfg.lr_schedule == "step":
        boundaries = [int(e * steps_per_epoch) for e in cfg.lr_steps]
        values = [cfg.learning_rate * 0.1 ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else cfg.learning_rate
    return cfg.learning_rate


def build_optimizer(cfg: TrainConfig,
                    schedule: keras.optimizers.schedules.LearningRateSchedule | float) -> keras.optimizers.Optimizer:
    decay = cfg.backbone_weight_decay or None
    if cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=decay)
    else:
        opt = keras.optimizers.Adam(schedule, weight_decay=decay)
    if decay:
        # decoupled decay on kernels only: decaying BN scales and biases only hurts
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "moving"])
    return opt


class _CheckpointCallback(keras.callbacks.Callback):
    """Keeps the step/epoch counters and writes checkpoints during fit()."""

    def __init__(self, manager: tf.train.CheckpointManager, step: tf.Variable, epoch: tf.Variable,
                 every_steps: int, max_steps: int | None) -> None:
        super().__init__()
        self.manager, self.step, self.epoch = manager, step, epoch
        self.every_steps, self.max_steps = every_steps, max_steps

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step.assign_add(1)
        step = int(self.step.numpy())
        if self.every_steps and step % self.every_steps == 0:
            self.manager.save(checkpoint_number=step)
        if self.max_steps and step >= self.max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=int(self.step.numpy()))
        if logs:
            log.info("epoch %d: %s", epoch + 1, {k: round(float(v), 4) for k, v in logs.items()})


@dataclass
class TrainingRun:
    """What one training session works with: the parts train() builds, handed to the fit()/custom loop."""

    cfg: TrainConfig
    model: keras.Model  # embedding model + margin head: (image, label) -> logits
    optimizer: keras.optimizers.Optimizer
    loss_fn: MarginLoss
    dataset: tf.data.Dataset
    manager: tf.train.CheckpointManager
    step: tf.Variable  # optimiser steps so far (restored on resume)
    epoch: tf.Variable  # finished epochs (restored on resume)
    steps_per_epoch: int
    epochs: int
    total_steps: int
    run_dir: Path


def tensorboard_available() -> bool:
    """tf.summary needs the tensorboard package, which tensorflow-cpu does not always bring."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train per ``cfg``; returns the run directory (its embedding weights are final)."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.tensorboard and not tensorboard_available():
        log.warning("tensorboard is not installed: no TensorBoard logs for this run (pip install tensorboard)")
        cfg.tensorboard = False
    run_dir = cfg.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    dataset, files, num_examples = training_dataset(cfg)
    steps_per_epoch = cfg.steps_per_epoch or max(num_examples // cfg.batch_size, 1)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    log.info("training %s: %d images, %d identities, %d steps/epoch, %d steps, mode %s",
             cfg.name, num_examples, files.num_classes, steps_per_epoch, total_steps, cfg.mode)

    embedding_model = build_embedding_model(cfg)
    head = build_margin_head(cfg, files.num_classes)
    model = build_training_model(embedding_model, head)
    optimizer = build_optimizer(cfg, learning_rate_schedule(cfg, steps_per_epoch, total_steps))
    loss_fn = MarginLoss(label_smoothing=cfg.label_smoothing)

    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = training_checkpoint(embedding_model, head, optimizer, step, epoch)
    manager = tf.train.CheckpointManager(checkpoint, str(run_dir / CHECKPOINT_DIR), max_to_keep=cfg.keep_checkpoints)
    if resume and manager.latest_checkpoint:
        # the optimizer creates its slots lazily; build them now so the restore fills them at once
        optimizer.build(model.trainable_variables)
        checkpoint.restore(manager.latest_checkpoint)
        log.info("resumed from %s (epoch %d, step %d)", manager.latest_checkpoint, int(epoch.numpy()), int(step.numpy()))

    start = time.monotonic()
    run = TrainingRun(cfg, model, optimizer, loss_fn, dataset, manager, step, epoch, steps_per_epoch, epochs,
                      total_steps, run_dir)
    if cfg.mode == "fit":
        _fit(run)
    else:
        _custom_loop(run)
    if cfg.bn_recalibration_steps:
        recalibrate_batchnorm(embedding_model, cfg, cfg.bn_recalibration_steps)
        manager.save(checkpoint_number=int(step.numpy()))  # so the last checkpoint equals the final weights
    elapsed = time.monotonic() - start

    save_run(run_dir, cfg, embedding_model, files.class_names)
    summary = {"name": cfg.name, "steps": int(step.numpy()), "epochs": int(epoch.numpy()),
               "images": num_examples, "identities": files.num_classes, "seconds": round(elapsed, 1)}
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("finished %s in %.0fs: %s", cfg.name, elapsed, summary)
    return run_dir


def recalibrate_batchnorm(model: keras.Model, cfg: TrainConfig, steps: int) -> None:
    """Replace every BN layer's moving statistics by their average over ``steps`` clean batches.

    Moving averages lag the weights (and trail the augmented data); inference wants the statistics
    of the final weights on un-augmented faces. Dropout is off during the pass so the statistics
    after it match inference.
    """
    from .data import training_dataset

    clean = cfg.model_copy(update={"augment": False})
    dataset, _, _ = training_dataset(clean)
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    dropouts = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Dropout)]
    saved = [(layer, layer.momentum) for layer in norms] + [(layer, layer.rate) for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for i, (inputs, _) in enumerate(dataset.take(steps)):
            for layer in norms:
                layer.momentum = i / (i + 1.0)  # cumulative mean over the batches seen so far
            model(inputs["input_image"], training=True)  # eager: the momentum set above is read now
    finally:
        for layer, value in saved:
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = value
            else:
                layer.momentum = value
    log.info("re-estimated BatchNorm statistics of %d layers on %d clean batches", len(norms), steps)


def _all_layers(model: keras.Model) -> list:
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if isinstance(layer, keras.Model):
            layers += _all_layers(layer)
    return layers


def _fit(run: TrainingRun) -> None:
    cfg, model, step, epoch, steps_per_epoch = run.cfg, run.model, run.step, run.epoch, run.steps_per_epoch
    epochs, total_steps = run.epochs, run.total_steps
    model.compile(optimizer=run.optimizer, loss=run.loss_fn, metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    callbacks = [_CheckpointCallback(run.manager, step, epoch, cfg.checkpoint_every_steps, total_steps)]
    if cfg.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(run.run_dir / "logs"), update_freq=max(steps_per_epoch // 10, 1)))
    initial_epoch = int(epoch.numpy())
    if initial_epoch >= epochs or int(step.numpy()) >= total_steps:
        log.info("nothing to do: already at epoch %d", initial_epoch)
        return
    model.fit(run.dataset, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
              callbacks=callbacks, verbose=cfg.verbose)


def _custom_loop(run: TrainingRun) -> None:
    cfg, model, optimizer, loss_fn, manager = run.cfg, run.model, run.optimizer, run.loss_fn, run.manager
    step, epoch, steps_per_epoch, total_steps = run.step, run.epoch, run.steps_per_epoch, run.total_steps
    writer = tf.summary.create_file_writer(str(run.run_dir / "logs" / "train")) if cfg.tensorboard else None
    accuracy = keras.metrics.SparseCategoricalAccuracy()

    @tf.function
    def train_step(inputs: dict[str, tf.Tensor], labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True)
            # regularisation losses (the L2 on the embedding Dense and the centres) are added by hand here;
            # fit() does the same implicitly
            loss = tf.reduce_mean(loss_fn(labels, logits)) + tf.add_n(model.losses or [tf.constant(0.0)])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, logits

    iterator = iter(run.dataset)
    while int(step.numpy()) < total_steps:
        current_epoch = int(epoch.numpy())
        progbar = keras.utils.Progbar(steps_per_epoch, verbose=cfg.verbose, stateful_metrics=["acc"])
        accuracy.reset_state()
        for batch in range(steps_per_epoch):
            inputs, labels = next(iterator)
            loss, logits = train_step(inputs, labels)
            accuracy.update_state(labels, logits)
            step.assign_add(1)
            current = int(step.numpy())
            progbar.update(batch + 1, [("loss", float(loss)), ("acc", float(accuracy.result()))])
            if writer is not None and current % max(steps_per_epoch // 10, 1) == 0:
                with writer.as_default():
                    tf.summary.scalar("loss", loss, step=current)
                    tf.summary.scalar("accuracy", accuracy.result(), step=current)
                    tf.summary.scalar("learning_rate", optimizer.learning_rate, step=current)
            if cfg.checkpoint_every_steps and current % cfg.checkpoint_every_steps == 0:
                manager.save(checkpoint_number=current)
            if current >= total_steps:
                break
        epoch.assign(current_epoch + 1)
        manager.save(checkpoint_number=int(step.numpy()))
        log.info("epoch %d: loss %.4f acc %.4f", current_epoch + 1, float(loss), float(accuracy.result()))
