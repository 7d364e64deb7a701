"""Checkpoints: this exporter's run directories, and the public arcface-tf2 project's layout.

Ours (a run directory ``runs/<name>/``):
  ``config.yaml``           the full training config (model shape, normalisation)
  ``classes.txt``           identity per label, line i = label i
  ``embedding.weights.h5``  final embedding-model weights (Keras 3 ``save_weights``)
  ``checkpoints/``          ``tf.train.Checkpoint`` of embedding model, head, optimizer, step and
                            epoch: what ``train --resume`` continues from

arcface-tf2 (``checkpoints/<sub_name>/e_<epoch>_b_<batch>.ckpt``): a Keras 2 ``save_weights`` TF
checkpoint of its training model. Keras 3 cannot read those with ``load_weights``, but the file is a
plain TF object-graph checkpoint whose keys follow Keras 2's tracking names, e.g.
``layer_with_weights-0/layer_with_weights-3/gamma/.ATTRIBUTES/VARIABLE_VALUE`` is the 4th layer
with weights of the backbone (the 1st layer with weights of the model). Our embedding model has the
same structure (input, backbone, ``OutputLayer``), so :func:`load_arcface_tf2` walks it in the same
order and reads each variable by that key. The head (``layer_with_weights-2``) is left unread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import tensorflow as tf

from .config import TrainConfig, load_config, save_config

log = logging.getLogger(__name__)

EMBEDDING_WEIGHTS = "embedding.weights.h5"
CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.txt"
CHECKPOINT_DIR = "checkpoints"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Keras 3 names a DepthwiseConv2D kernel "kernel"; Keras 2 tracked it as "depthwise_kernel".
KERAS2_ATTRIBUTE = {("DepthwiseConv2D", "kernel"): "depthwise_kernel"}
# arcface-tf2 feeds RGB / 255; its configs carry no mean/std (see load_embedding_model)
ARCFACE_TF2_NORMALISATION = {"mean": 0.0, "std": 255.0}


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model it is loaded into."""


# --- ours -------------------------------------------------------------------------------------------

def training_checkpoint(embedding_model: keras.Model, head: keras.layers.Layer, optimizer: keras.optimizers.Optimizer,
                        step: tf.Variable, epoch: tf.Variable) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(embedding=embedding_model, head=head, optimizer=optimizer, step=step, epoch=epoch)


def save_run(run_dir: Path, cfg: TrainConfig, embedding_model: keras.Model, class_names: list[str]) -> Path:
    """Write the final config, class list and embedding weights of a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    (run_dir / CLASSES_FILE).write_text("\n".join(class_names) + "\n")
    weights = run_dir / EMBEDDING_WEIGHTS
    embedding_model.save_weights(str(weights))
    return weights


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[TrainConfig, keras.Model]:
    """The config and embedding model of a run directory (final weights, else latest checkpoint)."""
    from .backbones import build_embedding_model

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    model = build_embedding_model(cfg, imagenet_weights=False)
    weights = run_dir / EMBEDDING_WEIGHTS
    if weights.exists():
        model.load_weights(str(weights))
        log.info("loaded %s", weights)
        return cfg, model
    latest = tf.train.latest_checkpoint(str(run_dir / CHECKPOINT_DIR))
    if not latest:
        raise CheckpointError(f"{run_dir} has neither {EMBEDDING_WEIGHTS} nor a checkpoint")
    tf.train.Checkpoint(embedding=model).restore(latest).expect_partial().assert_existing_objects_matched()
    log.info("loaded embedding from training checkpoint %s", latest)
    return cfg, model


# --- arcface-tf2 layout -----------------------------------------------------------------------------

def _layers_with_weights(model: keras.Model) -> list[keras.layers.Layer]:
    # Keras 2 numbered layers with weights in model.layers order; Keras 3 keeps that order
    return [layer for layer in model.layers if layer.weights]


def keras2_variable_keys(model: keras.Model, prefix: str = "") -> list[tuple[str, tf.Variable]]:
    """(checkpoint key, variable) for every variable of ``model``, named as Keras 2 tracked them."""
    keys = []
    for index, layer in enumerate(_layers_with_weights(model)):
        path = f"{prefix}layer_with_weights-{index}/"
        if isinstance(layer, keras.Model):
            keys += keras2_variable_keys(layer, path)
            continue
        for variable in layer.weights:
            attribute = KERAS2_ATTRIBUTE.get((type(layer).__name__, variable.name), variable.name)
            keys.append((f"{path}{attribute}{VALUE_SUFFIX}", variable))
    return keys


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint prefix from a prefix, a ``.index`` file or a directory (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path))
        if not latest:
            raise CheckpointError(f"no checkpoint in {path}")
        return latest
    prefix = str(path.with_suffix("")) if path.suffix == ".index" else str(path)
    if not Path(prefix + ".index").exists():
        # TF's own error here is a NotFoundError traceback from deep inside the reader
        raise FileNotFoundError(f"no checkpoint at {path} (expected a run directory, a checkpoint prefix "
                                "with its .index file, or a directory of checkpoints)")
    return prefix


def load_arcface_tf2(model: keras.Model, checkpoint: str | Path) -> dict:
    """Load an arcface-tf2 checkpoint into our embedding model; every embedding variable must match.

    Works for checkpoints written from the project's training form (with a head, ignored here) or
    its inference form, and for checkpoints whose root is the model or an object holding it.
    """
    prefix_path = resolve_checkpoint(checkpoint)
    reader = tf.train.load_checkpoint(prefix_path)
    available = reader.get_variable_to_shape_map()
    wanted = keras2_variable_keys(model)
    # the model may sit under a named attribute of the checkpoint root (tf.train.Checkpoint(model=...))
    first_key = wanted[0][0]
    roots = sorted({k[: -len(first_key)] for k in available if k.endswith(first_key)}, key=len)
    if not roots:
        raise CheckpointError(f"{prefix_path} has no arcface-tf2 layout variable like {first_key}")
    root = roots[0]
    missing, mismatched = [], []
    for key, variable in wanted:
        full = root + key
        if full not in available:
            missing.append(full)
            continue
        value = reader.get_tensor(full)
        if tuple(value.shape) != tuple(variable.shape):
            mismatched.append(f"{full}: checkpoint {value.shape} vs model {tuple(variable.shape)}")
            continue
        variable.assign(value)
    if missing or mismatched:
        raise CheckpointError(
            f"{prefix_path} does not match the {model.name} model (backbone or embedding size differ?): "
            f"{len(missing)} missing, {len(mismatched)} mismatched; first: {(missing + mismatched)[:3]}")
    used = {root + k for k, _ in wanted}
    unused = sorted(k for k in available if k not in used and k.endswith(VALUE_SUFFIX)
                    and "optimizer" not in k and "save_counter" not in k)
    log.info("loaded %d variables from %s (%d head/other variables not used)", len(wanted), prefix_path, len(unused))
    return {"checkpoint": prefix_path, "loaded": len(wanted), "unused": unused}


def _keras2_tree(model: keras.Model) -> tf.Module:
    """A trackable tree with Keras 2's child names, holding the model's own tf.Variables."""
    node = tf.Module()
    for index, layer in enumerate(_layers_with_weights(model)):
        if isinstance(layer, keras.Model):
            child = _keras2_tree(layer)
        else:
            child = tf.Module()
            for variable in layer.weights:
                attribute = KERAS2_ATTRIBUTE.get((type(layer).__name__, variable.name), variable.name)
                setattr(child, attribute, variable.value)
        setattr(node, f"layer_with_weights-{index}", child)
    return node


def save_arcface_tf2_layout(model: keras.Model, path: str | Path) -> str:
    """Write ``model``'s weights as arcface-tf2's Keras 2 ``save_weights`` would lay them out.

    Keras 3 cannot write that format itself; this builds the same object graph (child names
    ``layer_with_weights-N``, variables by attribute) and saves it with ``tf.train.Checkpoint``.
    Used by the tests, and to hand weights back to users of that project.
    """
    tree = _keras2_tree(model)
    children = {name: value for name, value in vars(tree).items() if name.startswith("layer_with_weights-")}
    checkpoint = tf.train.Checkpoint(**children)
    return checkpoint.write(str(path))


def load_embedding_model(source: str | Path, config: str | Path | None = None,
                         overrides: list[str] | None = None) -> tuple[TrainConfig, keras.Model]:
    """Our run directory, or an arcface-tf2 checkpoint (then ``config`` gives its yaml, e.g. arc_mbv2.yaml).

    Normalisation of an arcface-tf2 checkpoint: that project trains on RGB / 255 and its YAMLs have no
    mean/std keys, so ``mean=0, std=255`` is the default here (not our 127.5/127.5). A ``mean`` or
    ``std`` key in the YAML replaces that default, and a ``mean=``/``std=`` override replaces both;
    each key on its own. The values used are logged.
    """
    from .backbones import build_embedding_model

    source = Path(source)
    if source.is_dir() and (source / CONFIG_FILE).exists():
        return load_run(source, overrides)
    cfg = load_config(config, overrides, defaults=ARCFACE_TF2_NORMALISATION)
    log.info("arcface-tf2 checkpoint: input normalisation (x - %g) / %g", cfg.mean, cfg.std,
             extra={"mean": cfg.mean, "std": cfg.std})
    model = build_embedding_model(cfg, imagenet_weights=False)
    load_arcface_tf2(model, source)
    return cfg, model
