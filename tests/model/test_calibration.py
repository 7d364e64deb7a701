"""The impostor tail and the gallery-size-aware identify threshold (service.model.calibration)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from service.gallery.openset import GalleryCounts, ThresholdInputs, identify_threshold
from service.model.calibration import (
    FACES_ALPHA,
    CalibrationError,
    ImpostorTail,
    calibration_file,
    effective_comparisons,
    far_for_fpir,
    fpir_for_far,
    hub_probability,
    impostor_histogram,
    impostor_tail,
    poisson_tail,
    tail_from_histogram,
    threshold_for_gallery,
)
from service.model.contract import ContractError, FaceContract
from service.model.prepare import SFACE_CONTRACT, packaged_impostor_tail


def _population(people: int, per_person: int, dim: int = 32, spread: float = 0.6, seed: int = 0):
    """Faces as person centre + noise on the unit sphere: same-person faces correlate, as real ones do."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, dim))
    x = np.repeat(centres, per_person, axis=0) + spread * rng.normal(size=(people * per_person, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(people), per_person)


def test_histogram_counts_every_cross_person_pair_once_and_matches_brute_force():
    x, labels = _population(40, 3)
    counts = impostor_histogram(x, labels, block=7)  # a block size that does not divide the rows
    sims = x @ x.T
    i, j = np.triu_indices(len(x), k=1)
    impostor = sims[i, j][labels[i] != labels[j]]
    assert counts.sum() == len(impostor) == (120 * 119 // 2 - 40 * 3)
    tail = tail_from_histogram(counts, min_pairs=100)
    for far, cosine in zip(tail.far, tail.cosine):
        # the table's cosine is the score a share `far` of the impostor pairs reaches (to the 1e-4 bin)
        assert np.mean(impostor >= cosine - 1e-4) >= far
        assert np.mean(impostor >= cosine + 2e-4) <= far


def test_tail_lookups_are_monotone_and_inverse():
    tail = packaged_impostor_tail()
    assert tail is not None and tail.pairs > 30_000_000 and tail.far[-1] <= 5e-5
    fars = np.logspace(-1, -7, 25)
    thresholds = [tail.threshold_at(f) for f in fars]
    assert all(b >= a for a, b in zip(thresholds, thresholds[1:]))
    for far, t in zip(fars, thresholds):
        assert tail.far_at(t) == pytest.approx(far, rel=0.05)
    # beyond the measured tail: extrapolated, still rising, never above 1
    assert tail.extrapolated(1e-9) and not tail.extrapolated(1e-4) and tail.extrapolated(1e-5)
    assert thresholds[-1] < tail.threshold_at(1e-9) <= 1.0


def test_fpir_far_conversions_are_inverse():
    for fpir in (0.001, 0.01, 0.1):
        for n in (1, 10, 5000, 1e6):
            far = far_for_fpir(fpir, n)
            assert fpir_for_far(far, n) == pytest.approx(fpir, rel=1e-9)
    assert far_for_fpir(0.01, 1000) == pytest.approx(1 - 0.99 ** (1 / 1000))


def test_threshold_rises_with_gallery_size_and_falls_when_it_shrinks():
    tail = packaged_impostor_tail()
    sizes = [10, 300, 1680, 4749, 100_000]
    thresholds = [threshold_for_gallery(tail, 0.01, n, n).threshold for n in sizes]
    assert all(b > a + 0.005 for a, b in zip(thresholds, thresholds[1:])), thresholds
    # the per-comparison FAR behind it is what keeps FPIR at the target
    chosen = threshold_for_gallery(tail, 0.01, 4749, 4749)
    assert fpir_for_far(tail.far_at(chosen.threshold), 4749) == pytest.approx(0.01, rel=0.05)


def test_several_faces_per_identity_raise_the_threshold_less_than_as_many_identities():
    tail = packaged_impostor_tail()
    one = threshold_for_gallery(tail, 0.01, 1000, 1000)
    four = threshold_for_gallery(tail, 0.01, 1000, 4000)
    as_identities = threshold_for_gallery(tail, 0.01, 4000, 4000)
    assert four.n_eff == pytest.approx(1000 * 4 ** FACES_ALPHA)
    assert one.threshold < four.threshold <= as_identities.threshold
    assert threshold_for_gallery(tail, 0.01, 1000, 4000, alpha=0.5).threshold < four.threshold
    assert effective_comparisons(0, 0) == 0 and effective_comparisons(5, 3) == 5  # faces never below identities


def test_multi_face_accounting_holds_fpir_on_correlated_faces():
    """Synthetic faces of one person correlate; counting only identities (alpha 0) lets more strangers
    through than the service's accounting, which keeps FPIR near target at 3 faces each."""
    x, labels = _population(700, 4, dim=24, spread=0.5, seed=1)
    calib = labels < 300
    tail = impostor_tail(x[calib], labels[calib])
    gallery_people = np.arange(300, 500)
    unknown = x[labels >= 500]
    faces = x[np.isin(labels, gallery_people) & (np.arange(len(x)) % 4 < 3)]  # 3 faces each
    best = (unknown @ faces.T).max(axis=1)
    fpirs = {}
    for alpha in (FACES_ALPHA, 0.0):
        t = threshold_for_gallery(tail, 0.05, 200, len(faces), alpha).threshold
        fpirs[alpha] = float(np.mean(best >= t))
    assert fpirs[0.0] > fpirs[FACES_ALPHA]
    assert 0.05 / 2 <= fpirs[FACES_ALPHA] <= 0.05 * 2, fpirs


def test_contract_round_trips_the_tail_and_rejects_a_broken_one():
    meta = SFACE_CONTRACT.to_metadata()
    assert json.loads(meta["face.impostor_tail"])["pairs"] == SFACE_CONTRACT.impostor_tail.pairs
    back = FaceContract.from_metadata(meta)
    assert back.impostor_tail.far == SFACE_CONTRACT.impostor_tail.far
    assert back.impostor_tail.cosine == SFACE_CONTRACT.impostor_tail.cosine
    assert "face.impostor_tail" not in back.extra
    broken = dict(meta, **{"face.impostor_tail": json.dumps({"far": [0.1, 0.2], "cosine": [0.1, 0.2], "pairs": 9})})
    with pytest.raises(ContractError, match="impostor_tail"):
        FaceContract.from_metadata(broken)
    with pytest.raises(ContractError):
        FaceContract.from_metadata(dict(meta, **{"face.impostor_tail": "{not json"}))


def test_too_few_pairs_is_refused():
    x, labels = _population(5, 2)
    with pytest.raises(CalibrationError, match="impostor pairs"):
        impostor_tail(x, labels)
    with pytest.raises(CalibrationError, match="two people"):
        impostor_tail(x[:2], np.zeros(2))


def test_overrides_win_over_the_fpir_threshold():
    tail = packaged_impostor_tail()
    inputs = ThresholdInputs(fixed=None, fpir=0.01, model_identify=0.42, verify=0.314)
    counts = GalleryCounts(4749, 4749, 4749)
    auto = identify_threshold(inputs, counts, tail, "model")
    assert auto.source == "fpir" and auto.fpir_target == 0.01 and auto.threshold > 0.42
    assert auto.fpir_estimated == pytest.approx(0.01, rel=0.05)
    fixed = identify_threshold(ThresholdInputs(0.5, 0.01, 0.42, 0.314), counts, tail, "model")
    assert (fixed.threshold, fixed.source, fixed.fpir_target) == (0.5, "setting", None)
    asked = identify_threshold(ThresholdInputs(0.5, 0.01, 0.42, 0.314), counts, tail, "model", requested=0.3)
    assert (asked.threshold, asked.source) == (0.3, "request")
    # the estimate still describes the threshold used: a looser one lets more strangers through
    assert asked.fpir_estimated > auto.fpir_estimated
    no_tail = identify_threshold(inputs, counts, None, None)
    assert (no_tail.threshold, no_tail.source, no_tail.stranger_probability(0.9)) == (0.42, "model", None)
    # a tiny gallery never gets a looser threshold than 1:1 verification
    assert identify_threshold(inputs, GalleryCounts(1, 1, 1), tail, "model").threshold >= 0.314


def test_stranger_probability_falls_with_score_and_grows_with_gallery():
    tail = packaged_impostor_tail()
    small = identify_threshold(ThresholdInputs(None, 0.01, None, 0.314), GalleryCounts(100, 100, 100), tail, "model")
    large = identify_threshold(ThresholdInputs(None, 0.01, None, 0.314), GalleryCounts(10_000, 10_000, 10_000), tail, "model")
    scores = [0.3, 0.4, 0.5, 0.6, 0.7]
    probs = [large.stranger_probability(s) for s in scores]
    assert all(b < a for a, b in zip(probs, probs[1:]))
    assert all(small.stranger_probability(s) < large.stranger_probability(s) for s in scores)
    assert large.stranger_probability(large.threshold) == pytest.approx(0.01, rel=0.05)
    assert 0 <= probs[-1] < 1e-3 and not math.isnan(probs[0])


def test_malformed_tail_tables_are_refused():
    with pytest.raises(CalibrationError):
        ImpostorTail(far=(0.1,), cosine=(0.2,), pairs=10)
    with pytest.raises(CalibrationError):
        ImpostorTail(far=(0.1, 0.01), cosine=(0.3, 0.2), pairs=10)  # cosine must rise as FAR falls
    with pytest.raises(CalibrationError):
        ImpostorTail.from_json('{"far": [0.1]}')


def test_a_person_with_many_faces_takes_part_with_five_only():
    x, labels = _population(30, 2)
    many, many_labels = _population(1, 40, seed=3)
    x, labels = np.concatenate([x, many]), np.concatenate([labels, many_labels + 100])
    counts = impostor_histogram(x, labels)
    assert counts.sum() == 60 * 5 + (60 * 59 // 2 - 30)  # 5 of the 40 faces against the other 60
    assert impostor_histogram(x, labels, max_per_person=None).sum() == 60 * 40 + (60 * 59 // 2 - 30)


def test_exporter_evaluation_writes_the_tail_into_an_onnx_contract(tmp_path, default_model):
    """`python -m exporter evaluate --write-threshold` path: the tail over the protocol's people goes
    into face.impostor_tail next to face.threshold (too few people: no tail, no error)."""
    import shutil

    from exporter.evaluate import pairs_impostor_tail, write_threshold_into
    from service.model.contract import read_contract

    x, labels = _population(80, 2, dim=128)
    paths = [tmp_path / f"person{label}" / f"{i}.jpg" for i, label in enumerate(labels)]
    tail = pairs_impostor_tail(paths, x, "synthetic")
    assert tail["pairs"] == 160 * 159 // 2 - 80 and tail["source"] == "synthetic"
    assert pairs_impostor_tail(paths[:6], x[:6], "too small") is None
    model = shutil.copy(default_model, tmp_path / "model.onnx")
    write_threshold_into(model, 0.3, "10-fold:test", tail)
    contract = read_contract(model)
    assert contract.threshold == 0.3 and contract.impostor_tail.pairs == tail["pairs"]
    assert contract.impostor_tail.cosine == tuple(tail["cosine"])


def test_gallery_tail_file_is_read_for_its_model_only_and_follows_changes(tmp_path):
    from service.gallery.openset import CALIBRATION_FILE, GalleryTail, save_gallery_tail

    tail = packaged_impostor_tail()
    reader = GalleryTail(tmp_path, "sface@2021dec-int8bq")
    assert reader.current() is None  # none stored yet
    save_gallery_tail(tmp_path, "other@1", tail)
    assert reader.current() is None  # another model's calibration is ignored
    stored = save_gallery_tail(tmp_path, "sface@2021dec-int8bq", tail, {"people": 7})
    assert stored == tmp_path / "calibration" / "sface@2021dec-int8bq" / CALIBRATION_FILE
    assert reader.current().cosine == tail.cosine
    stored.write_text("{broken")
    assert reader.current() is None  # unreadable: ignored (logged), the model's tail applies


def test_tail_lookups_use_arrays_made_once_and_answer_as_the_table_says():
    """/identify looks up every candidate: the log-FAR and cosine arrays are made once per tail (and
    read-only, being shared), and the lookups still interpolate the table as before."""
    tail = packaged_impostor_tail()
    first = tail.far_at(0.5)
    assert tail._log_far is tail._log_far and not tail._log_far.flags.writeable
    assert not tail._cosines.flags.writeable
    lx, y = np.log10(np.asarray(tail.far)), np.asarray(tail.cosine)
    for cosine in np.linspace(y[0] + 1e-3, y[-1] - 1e-3, 25):
        assert tail.far_at(float(cosine)) == float(10 ** np.interp(cosine, y, lx))
    for far in tail.far[::3]:
        assert tail.threshold_at(far) == float(np.interp(math.log10(far), lx[::-1], y[::-1]))
    assert tail.far_at(0.5) == first and tail.far_at(-1.0) == tail.far[0]


def test_poisson_tail_is_exact_and_keeps_tiny_values():
    for lam, m in ((0.5, 2), (1.0, 3), (0.01, 4), (2.5, 6)):
        direct = 1 - sum(math.exp(-lam) * lam ** k / math.factorial(k) for k in range(m))
        assert poisson_tail(lam, m) == pytest.approx(direct, rel=1e-9)
    assert poisson_tail(1e-3, 16) == pytest.approx(math.exp(-1e-3) * 1e-48 / math.factorial(16), rel=1e-3)
    assert poisson_tail(5.0, 3) == 1.0 and poisson_tail(0.0, 2) == 0.0 and poisson_tail(0.3, 0) == 1.0


def test_hub_probability_judges_many_high_scores_not_one():
    tail = packaged_impostor_tail()
    likeness = [0.9] * 7 + [0.05] * 9  # the same person under 7 other ids: not judged
    assert hub_probability(tail, likeness, 1000)[0] == pytest.approx(1.0)
    copies = [1.0] * 12 + [0.05] * 4  # the same picture enrolled 12 times: copies, not judged
    assert hub_probability(tail, copies, 1000)[0] == pytest.approx(1.0)
    hub = [0.45] * 16  # 16 identities at a score an impostor pair reaches with FAR ~1e-5
    probability, rank = hub_probability(tail, hub, 200)
    assert probability < 1e-30 and rank == 16 and hub_probability(tail, hub[:7], 200)[0] == 1.0
    # the same scores are less surprising in a gallery 100 times larger, never more
    assert hub_probability(tail, hub, 20_000)[0] > probability
    assert hub_probability(tail, [], 100) == (1.0, 0)


def test_each_model_keeps_its_own_gallery_calibration(tmp_path):
    """Several served models share a data dir: calibrating one must not replace another's tail or
    quality (each model's collections decide by their own model's calibration)."""
    from service.faces.quality import gallery_quality, save_gallery_quality
    from service.gallery.openset import GalleryTail, save_gallery_tail

    tail = packaged_impostor_tail()
    other = ImpostorTail(far=tail.far[:6], cosine=tuple(c + 0.01 for c in tail.cosine[:6]), pairs=999)
    save_gallery_tail(tmp_path, "sface@2021dec-int8bq", tail)
    save_gallery_tail(tmp_path, "tiny@1", other)
    assert GalleryTail(tmp_path, "sface@2021dec-int8bq").current().cosine == tail.cosine
    assert GalleryTail(tmp_path, "tiny@1").current().pairs == 999
    assert GalleryTail(tmp_path, "other@1").current() is None

    quality = SFACE_CONTRACT.quality
    save_gallery_quality(tmp_path, "sface@2021dec-int8bq", quality)
    save_gallery_quality(tmp_path, "tiny@1", quality)
    assert gallery_quality(tmp_path, "sface@2021dec-int8bq") == quality
    assert gallery_quality(tmp_path, "tiny@1") == quality
    assert gallery_quality(tmp_path, "other@1") is None


def test_calibrations_saved_at_once_each_land_whole(tmp_path):
    """Two calibrate runs at once (an operator's and a scheduled one) each write the model's files whole:
    neither fails, and a reader (the service re-reads the tail when its file changes) never finds a
    missing, empty or half-written file. Each writer writes a temporary file of its own and renames it."""
    import threading

    from service.faces.quality import gallery_quality, save_gallery_quality
    from service.gallery.openset import GalleryTail, save_gallery_tail

    model_id = "sface@2021dec-int8bq"
    tail = packaged_impostor_tail()
    quality = SFACE_CONTRACT.quality
    save_gallery_tail(tmp_path, model_id, tail)
    save_gallery_quality(tmp_path, model_id, quality)
    errors: list[BaseException] = []
    done = threading.Event()

    def write(seed: int) -> None:
        try:
            for i in range(40):
                save_gallery_tail(tmp_path, model_id, tail, {"writer": seed, "run": i, "pad": "x" * 20_000})
                save_gallery_quality(tmp_path, model_id, quality)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def read() -> None:
        reader = GalleryTail(tmp_path, model_id)
        try:
            while not done.is_set():
                assert reader.current() is not None  # unreadable would read as None (and be logged)
                assert gallery_quality(tmp_path, model_id) == quality
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(seed,)) for seed in range(3)]
    checker = threading.Thread(target=read)
    checker.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    checker.join()
    assert errors == []
    assert json.loads(calibration_file(tmp_path, model_id, "impostor_tail.json").read_text())["run"] == 39
    assert sorted(p.name for p in calibration_file(tmp_path, model_id, "x").parent.iterdir()) == [
        "impostor_tail.json", "quality.json"]  # no temporary file left behind


def test_a_calibration_stored_before_several_models_still_counts_for_its_model(tmp_path):
    """A data dir calibrated by an older service has DATA/impostor_tail.json and DATA/quality.json: they
    still apply to the model they name (and to no other) until that model is calibrated again."""
    from service.faces.quality import GALLERY_QUALITY_FILE, gallery_quality
    from service.gallery.openset import CALIBRATION_FILE, GalleryTail, save_gallery_tail

    tail = packaged_impostor_tail()
    model_id = "sface@2021dec-int8bq"
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"model_id": model_id, "tail": tail.to_dict()}))
    (tmp_path / GALLERY_QUALITY_FILE).write_text(json.dumps({"model_id": model_id,
                                                             "quality": json.loads(SFACE_CONTRACT.quality.to_json())}))
    reader = GalleryTail(tmp_path, model_id)
    assert reader.current().pairs == tail.pairs
    assert GalleryTail(tmp_path, "tiny@1").current() is None
    assert gallery_quality(tmp_path, model_id) == SFACE_CONTRACT.quality
    assert gallery_quality(tmp_path, "tiny@1") is None
    newer = ImpostorTail(far=tail.far[:6], cosine=tail.cosine[:6], pairs=321)
    save_gallery_tail(tmp_path, model_id, newer)  # the model's own file wins from now on
    assert reader.current().pairs == 321


def test_calibration_folders_are_one_per_model_id_and_safe(tmp_path):
    from service.model.calibration import calibration_file

    assert calibration_file(tmp_path, "tiny@1", "x.json") == tmp_path / "calibration" / "tiny@1" / "x.json"
    odd = [calibration_file(tmp_path, model_id, "x.json") for model_id in ("a/b@1", "a_b@1", "..", "../..", "")]
    assert len(set(odd)) == len(odd)
    assert all(path.parent.parent == tmp_path / "calibration" and not path.parent.name.startswith(".")
               for path in odd)
