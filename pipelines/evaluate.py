"""KID, FID and Inception Score of a sample set against a shard split, on features from torch-fidelity's extractors.

KID (reported as ``kid_std_<extractor>``) is the unbiased MMD² on features standardised by a fixed scaler (the
training split's per-feature mean and sd), with a 95% interval from its unbiased variance; FID and IS, biased at finite
counts, come with their bootstrap standard deviation at the counts used. Two feature extractors: torch-fidelity's
Inception-v3 (downloaded, or a weights file given by path for air-gapped clusters) and a small CNN classifier trained
once, deterministically, on the labelled training shards (as LeNet features are used for MNIST); its weights digest
versions every cache entry and metric record. Baselines at the same count: real held-out images the score network and
the classifier never saw (what a model indistinguishable from the data scores) and a Gaussian fitted to the training
split (a weak model)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
from tqdm import tqdm

from data_prep.loader import make_loader
from data_prep.manifest import Manifest, ShardError, load_manifest
from data_prep.sources import IMAGE_SUFFIXES, ImageFolderSource, SourceError, stratified_indices
from ncsn._checks import first_line
from ncsn.atomic import atomic_write
from ncsn.data import from_stored
from ncsn.metrics import Estimate, Scaler, Spread, bootstrap_spread, frechet_distance, inception_score, kid, kid_in_blocks

log = logging.getLogger(__name__)
CLASSIFIER = "ncsn-classifier"
CLASSIFIER_FORMAT = 2  # raised whenever the classifier changes: a cached one of another format is retrained
BOOTSTRAP_ROWS = 2000  # up to this many rows per set, every number uses all rows (the bootstrap and KID's kernels: O(rows²))
SCALER_ROWS = 2000  # training images whose features fix KID's scaler (a seeded draw; all of them when fewer)
KID_FEATURES = "standardised by the training split's per-feature mean and sd"


class EvaluationError(ValueError):
    """Bad evaluation input (samples, reference shards, weights file), with a message that names it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NCSN_CACHE", Path.home() / ".cache" / "ncsn-pipeline"))


@dataclass(frozen=True)
class Evaluation:
    """KID with its 95% interval, FID and IS with their spread, of one set of images against a reference split, and what
    made them."""

    extractor: str  # classifier | inception
    extractor_id: str  # digest of the extractor's weights
    reference_split: str  # train | validation | test
    num_samples: int
    num_reference: int
    kid: Estimate  # on standardised features (KID_FEATURES)
    fid: Spread
    inception_score: Spread

    def flat(self, prefix: str = "") -> dict[str, float]:
        """{kid_std_<extractor>: value, …_low/_high: its 95% interval, fid_<extractor>, …_sd, is_<extractor>, …_sd,
        num_samples, num_reference}, keys prefixed."""
        key = f"{prefix}kid_std_{self.extractor}"
        out = {key: self.kid.value, f"{key}_low": self.kid.low, f"{key}_high": self.kid.high}
        for name, spread in (("fid", self.fid), ("is", self.inception_score)):
            key = f"{prefix}{name}_{self.extractor}"
            out.update({key: spread.value, f"{key}_sd": spread.sd})
        return {**out, f"{prefix}num_samples": self.num_samples, f"{prefix}num_reference": self.num_reference}

    @classmethod
    def from_record(cls, record: dict) -> Evaluation:
        def parse(v):
            return (Estimate(**v) if "low" in v else Spread(**v)) if isinstance(v, dict) else v
        return cls(**{k: parse(v) for k, v in record.items()})


@dataclass(frozen=True)
class Report:
    """A model's evaluation, the baselines at its count ({name: Evaluation}) and the extractor's own record."""

    model: Evaluation
    baselines: dict[str, Evaluation] = field(default_factory=dict)
    extractor: dict[str, float] = field(default_factory=dict)  # classifier accuracies, dead features

    def flat(self) -> dict[str, float]:
        """Every number as one flat {name: float} for MLflow, Tune and summary.json."""
        out = {**self.model.flat(), **self.extractor}
        for name, evaluation in self.baselines.items():
            out.update(evaluation.flat(f"{name}_"))
        return out

    def record(self) -> dict:
        """JSON: each evaluation with its extractor id, reference split, counts, KID's interval and the others' spread."""
        return {"model": asdict(self.model), "baselines": {k: asdict(v) for k, v in self.baselines.items()},
                "extractor": self.extractor, "kid_features": KID_FEATURES}

    def table(self) -> str:
        """Metrics (rows) by model and baselines (columns), with each column's counts: KID value [95% interval], FID and IS
        value ±sd at these counts."""
        columns = {"model": self.model, **self.baselines}
        cells = {name: [str(getattr(e, attr)) for attr in ("kid", "fid", "inception_score")] for name, e in columns.items()}
        heads = {name: f"{name} ({e.num_samples} vs {e.num_reference} {e.reference_split})" for name, e in columns.items()}
        widths = {name: max(len(heads[name]), *(len(c) for c in cells[name])) for name in columns}
        rows = [f"  {'':<8}" + "".join(f"  {heads[n]:<{widths[n]}}" for n in columns)]
        for i, metric in enumerate(("kid_std", "fid", "is")):
            rows.append(f"  {metric:<8}" + "".join(f"  {cells[n][i]:<{widths[n]}}" for n in columns))
        rows.append("  (kid_std: KID on standardised features, value [95% interval]; fid, is: value ±sd at these counts)")
        return "\n".join(rows)


class UInt8Images(Dataset):
    """uint8 (N, H, W, C) images as torch-fidelity wants them: uint8 (3, H, W), grey repeated to RGB."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # a copy: arrays from Ray are read-only
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def read_split(shards: Manifest | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 NHWC) and labels of one split of a shard set (its manifest, or its location), in shard order
    (batches of one: none left over)."""
    images, labels = [], []
    for x, y in make_loader(shards, 1, split=split, num_workers=0, shuffle_buffer=0):
        images.append(x.permute(0, 2, 3, 1).numpy())
        labels.append(y.numpy())
    if not images:
        raise EvaluationError(f"{getattr(shards, 'location', shards)}: split {split!r} has no images")
    return np.concatenate(images), np.concatenate(labels)


def load_image_folder(path: str | Path, channels: int, size: int) -> np.ndarray:
    """Every PNG/JPEG under ``path`` (sorted by relative path) as uint8 (N, size, size, channels), converted as the shard
    job converts an image folder (8-bit modes only; to grey or RGB); images of another model, scored against our
    reference. Sizes are checked from the file headers before anything is decoded."""
    if Path(path).is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(path).rglob("*")):
        raise EvaluationError(f"{path} holds neither sample chunks (chunks/chunk_*.npz from `ncsn-pipeline sample`) "
                              "nor .png/.jpg/.jpeg images")
    try:
        source = ImageFolderSource(path, channels=channels, test_fraction=0, validation_fraction=0)
        source.check_size(size)
        images = [r.image for r in source.read("train", 0, source.count("train"))]
    except SourceError as err:
        raise EvaluationError(str(err)) from None
    return np.stack(images)


class Classifier(nn.Module):
    """A small CNN for 8–64 px images: three conv blocks with batch norm, a 128-d linear feature layer, class logits.
    The features are taken before the head's ReLU, so none is constant (dead) on the data."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(*block(channels, width), *block(width, width), *block(width, 2 * width, 2),
                                  *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * width, 128))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def _shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch translated by up to 1/8 of its size (edge pixels repeated): the classifier's only augmentation."""
    pad = max(1, x.shape[-1] // 8)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return nn.functional.pad(x, (pad,) * 4, mode="replicate")[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([model(b)[1].argmax(1) for b in x.split(1024)]) == y).float().mean())


def train_classifier(shards: Manifest | str, out: Path, seed: int = 0, batch_size: int = 64, max_epochs: int = 100, patience: int = 10,
                     progress: bool = True) -> dict:
    """Train the feature classifier deterministically (seeded) to convergence: a stratified 10% of the training split
    validates, the epoch of lowest validation loss is kept (at most ``max_epochs``, stopping ``patience`` epochs after
    the best). Saved with its validation and test accuracy; returns that record."""
    manifest = load_manifest(shards) if isinstance(shards, str) else shards
    x_train, y_train = read_split(manifest, "train")
    if (y_train < 0).any():
        raise EvaluationError(f"{shards}: the classifier feature extractor needs labelled training images and this shard set "
                              "has none; use --feature-extractor inception (with --inception-weights PATH on a machine "
                              "without internet)")
    x_test, y_test = read_split(manifest, "test")
    num_classes = len(manifest.classes or ()) or int(y_train.max()) + 1
    held = stratified_indices(y_train, max(num_classes, len(y_train) // 10), seed)
    fit = np.setdiff1d(np.arange(len(y_train)), held)
    xf, yf = from_stored(x_train[fit]), torch.from_numpy(y_train[fit]).long()
    xv, yv = from_stored(x_train[held]), torch.from_numpy(y_train[held]).long()
    log.info("training the feature classifier on %d images of %s (validated on %d; once per shard set, cached in %s)",
             len(fit), shards, len(held), out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same seed gives the same weights whatever the worker's CPU count
    try:
        model, epochs = _fit_classifier(xf, yf, xv, yv, num_classes, seed, batch_size, max_epochs, patience, progress)
    finally:
        torch.set_num_threads(threads)
    record = {"state_dict": model.state_dict(), "channels": x_train.shape[-1], "num_classes": num_classes, "image_size": x_train.shape[1],
              "test_accuracy": _accuracy(model, from_stored(x_test), torch.from_numpy(y_test).long()),
              "validation_accuracy": _accuracy(model, xv, yv), "epochs": epochs, "seed": seed, "format": CLASSIFIER_FORMAT}
    atomic_write(out, lambda tmp: torch.save(record, tmp))
    log.info("classifier for %s: validation accuracy %.3f, test accuracy %.3f after %d epochs (%s)", shards,
             record["validation_accuracy"], record["test_accuracy"], record["epochs"], out)
    return record


def _fit_classifier(xf: torch.Tensor, yf: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, num_classes: int, seed: int,
                    batch_size: int, max_epochs: int, patience: int, progress: bool) -> tuple[Classifier, int]:
    """The training loop of train_classifier: the model at its best epoch (in eval mode) and that epoch's number."""
    torch.manual_seed(seed)
    model = Classifier(xf.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    best_loss, best_state, best_epoch = float("inf"), None, 0
    for epoch in tqdm(range(max_epochs), desc="feature classifier", unit="epoch", disable=None if progress else True):  # on a terminal
        model.train()
        for idx in torch.randperm(len(xf), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(_shifted(xf[idx], gen))[1], yf[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(torch.cat([nn.functional.cross_entropy(model(b)[1], t, reduction="none")
                                        for b, t in zip(xv.split(1024), yv.split(1024))]).mean())
        if val_loss < best_loss:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), best_epoch + 1


def _load_classifier(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _cached_classifier(path: str) -> dict | None:
    """The classifier record cached at ``path`` if it is one of this version (tensors only); else None, to retrain."""
    if not Path(path).exists():
        return None
    try:
        record = _load_classifier(path)
    except Exception as err:  # noqa: BLE001 — not tensors (a pickle is refused here), truncated, …
        log.warning("ignoring unreadable classifier cache %s (%s); retraining", path, type(err).__name__)
        return None
    if not isinstance(record, dict) or record.get("format") != CLASSIFIER_FORMAT:
        log.warning("classifier cache %s is from another version; retraining", path)
        return None
    return record


def _make_extractor_class():
    class ClassifierFeatures(FeatureExtractorBase):
        """torch-fidelity feature extractor over our classifier: "features" (128-d) for FID/KID, "logits" for IS."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise EvaluationError("the classifier feature extractor needs its weights file")
            record = _load_classifier(feature_extractor_weights_path)
            self.channels, self.size = record["channels"], record["image_size"]
            self.net = Classifier(record["channels"], record["num_classes"])
            self.net.load_state_dict(record["state_dict"])
            self.eval().requires_grad_(False)

        def forward(self, x: torch.Tensor):
            x = x.float() / 255
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            if x.shape[-1] != self.size:
                x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            features, logits = self.net(x)
            found = {"features": features, "logits": logits}
            return tuple(found[f] for f in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

    return ClassifierFeatures


def register_classifier_extractor() -> None:
    if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER, _make_extractor_class())


def check_inception_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` if it is plain tensors (weights_only=True); anything else is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EvaluationError(f"--inception-weights {path}: no such file") from None
    except Exception as err:  # noqa: BLE001 — unpickling refused or not a torch file
        raise EvaluationError(f"--inception-weights {path}: not a plain PyTorch state dict that loads with weights_only=True "
                              f"({type(err).__name__}: {first_line(err, 200)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaluationError(f"--inception-weights {path}: expected a state dict of tensors (torch-fidelity's pt_inception-2015-12-05 file)")
    return state


def _private_weights(state: dict[str, torch.Tensor], directory: str) -> str:
    """``state`` written by this process into its own 0700 directory: torch-fidelity unpickles the weights file it is
    given with weights_only=False, so it only ever gets bytes verified as tensors and written here."""
    path = Path(directory) / "inception.pt"
    torch.save(state, path)
    return str(path)


def _download_inception_weights() -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception weights from its URL, read as tensors only (the hub cache is user-writable)."""

    try:
        return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 — no network, or a cached file that is not plain tensors
        raise EvaluationError(f"cannot load the Inception weights from {URL_INCEPTION_V3} ({type(err).__name__}: "
                              f"{first_line(err, 200)}); on a machine without internet pass --inception-weights PATH") from None


def _tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of a state dict's names and tensor bytes: equal weights, equal digest."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Evaluator:
    """KID/FID/IS of uint8 sample arrays against one split of a shard set, with one feature extractor.

    Features come from torch-fidelity's extractor, metrics and intervals from ``ncsn.metrics``; torch-fidelity's own
    cache is never used (it unpickles with weights_only=False). Reference features and KID's scaler are cached as
    tensors-only files read with weights_only=True, keyed by the extractor's weights digest; an unreadable or mismatched
    cache file is recomputed, never trusted."""

    def __init__(self, shards: str, extractor: str = "classifier", inception_weights: str | dict[str, torch.Tensor] | None = None,
                 reference_split: str = "test", cache_dir: Path | None = None, resamples: int = 200, use_gpu: bool = False,
                 progress: bool = True):
        if extractor not in ("classifier", "inception"):
            raise EvaluationError(f"feature extractor must be classifier or inception, got {extractor!r}")
        if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 10:
            raise EvaluationError(f"bootstrap resamples must be an integer >= 10, got {resamples!r}")
        self.shards, self.extractor, self.split = shards, extractor, reference_split
        self.resamples, self.cuda = resamples, use_gpu and torch.cuda.is_available()
        self.progress = progress and sys.stderr.isatty()  # torch-fidelity's feature-extraction bar, on a terminal only
        self.manifest = load_manifest(shards)
        _check_split(self.manifest, reference_split)
        self.cache = (cache_dir or default_cache_dir()) / self.manifest.digest
        self._splits: dict[str, np.ndarray] = {}  # images of each split, decoded once
        self.reference = self.split_images(reference_split)
        self.info: dict[str, float] = {}
        self._extractor, self._scaler = None, None
        if extractor == "classifier":
            register_classifier_extractor()
            self.weights = str(self.cache / "classifier.pt")
            record = _cached_classifier(self.weights) or train_classifier(self.manifest, Path(self.weights), progress=progress)
            self.info = {"classifier_test_accuracy": float(record["test_accuracy"]),
                         "classifier_validation_accuracy": float(record["validation_accuracy"])}
            self.fidelity_name, state = CLASSIFIER, record["state_dict"]
        else:
            state = (check_inception_weights(inception_weights) if isinstance(inception_weights, str)
                     else inception_weights or _download_inception_weights())
            self._private = tempfile.TemporaryDirectory(prefix="ncsn-inception-")  # removed with this object
            self.weights, self.fidelity_name = _private_weights(state, self._private.name), "inception-v3-compat"
            try:  # torch-fidelity loads the weights as it builds the extractor: build it now, before any work
                self._extractor = self._build_extractor()
            except RuntimeError as err:
                origin = inception_weights if isinstance(inception_weights, str) else "(as given)"
                raise EvaluationError(f"--inception-weights {origin}: these tensors are not torch-fidelity's Inception v3 "
                                      f"({first_line(err, 160)})") from None
        self.extractor_id = _tensors_digest(state)  # the weights' content: a rebuild from the same seed has the same id

    def split_images(self, split: str) -> np.ndarray:
        """The uint8 NHWC images of one split of the shard set, decoded on first use."""
        if split not in self._splits:
            self._splits[split] = read_split(self.manifest, split)[0]
        return self._splits[split]

    def _layers(self) -> dict[str, str]:
        cls = FEATURE_EXTRACTORS_REGISTRY[self.fidelity_name]
        return {metric: cls.get_default_feature_layer_for_metric(metric) for metric in ("fid", "isc", "kid")}

    def _build_extractor(self) -> FeatureExtractorBase:
        return create_feature_extractor(self.fidelity_name, sorted(set(self._layers().values())), cuda=self.cuda,
                                        feature_extractor_weights_path=self.weights, verbose=False)

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{layer: (N, d) float64 features} of uint8 NHWC images from the extractor (built once)."""

        if self._extractor is None:
            self._extractor = self._build_extractor()
        found = get_featuresdict_from_dataset(UInt8Images(images), self._extractor, 64, self.cuda, True, self.progress)
        return {k: v.double().numpy() for k, v in found.items()}

    def _cached(self, name: str, compute, valid) -> dict[str, np.ndarray]:
        """``compute()``'s {name: 2-d array} from the tensors-only cache file ``name`` when ``valid`` accepts what it holds;
        otherwise computed and cached."""
        path = self.cache / f"{name}-{self.extractor}-{self.extractor_id}.pt"
        if path.exists():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(cached, dict) and all(isinstance(v, torch.Tensor) for v in cached.values()) and valid(cached):
                    return {k: v.numpy() for k, v in cached.items()}
                log.warning("cache %s does not hold what this evaluation needs; recomputing", path)
            except Exception as err:  # noqa: BLE001 — not tensors (a pickle is refused here), truncated, …
                log.warning("ignoring unreadable cache %s (%s); recomputing", path, type(err).__name__)
        out = compute()
        atomic_write(path, lambda tmp: torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}, tmp))
        return out

    def reference_features(self) -> dict[str, np.ndarray]:
        """The reference split's features, from the cache when it holds exactly those (tensors only), else computed."""
        layers = set(self._layers().values())
        return self._cached(f"features-{self.split}", lambda: self.features(self.reference),
                            lambda c: set(c) == layers and all(v.dim() == 2 and len(v) == len(self.reference) for v in c.values()))

    def scaler(self) -> Scaler:
        """KID's fixed feature scaler: the per-feature mean and sd of up to SCALER_ROWS training images (seed 0), once per
        extractor and shard set."""
        if self._scaler is None:
            def compute() -> dict[str, np.ndarray]:
                train = self.split_images("train")
                rows = np.sort(np.random.default_rng(0).permutation(len(train))[:SCALER_ROWS])
                fitted = Scaler.fit(self.features(train[rows])[self._layers()["kid"]])
                return {"mean": fitted.mean, "sd": fitted.sd}
            found = self._cached("kid-scaler", compute, lambda c: set(c) == {"mean", "sd"} and c["mean"].shape == c["sd"].shape)
            self._scaler = Scaler(found["mean"], found["sd"])
        return self._scaler

    def _check(self, images: np.ndarray, what: str) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:] != self.reference.shape[1:]:
            raise EvaluationError(f"{what} of shape {images.shape} ({images.dtype}) do not match the reference images "
                                  f"{self.reference.shape[1:]} (uint8)")
        if len(images) < 3:
            raise EvaluationError(f"{what}: {len(images)} image(s); KID's interval needs at least 3")

    def compare(self, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], seed: int = 0, reference_split: str | None = None) -> Evaluation:
        """KID (standardised features, 95% interval), FID and IS (bootstrap sd) of feature sets ``ours`` against ``ref``.
        Sets over BOOTSTRAP_ROWS rows: the values come from all rows (KID as the mean of the unbiased statistic over blocks
        of that size), KID's interval width and the sds from a random BOOTSTRAP_ROWS-row subset of each (wider than all
        rows would give: conservative)."""
        layers, split = self._layers(), reference_split or self.split
        n, m = len(ours[layers["fid"]]), len(ref[layers["fid"]])
        if max(n, m) <= BOOTSTRAP_ROWS:
            return self._compare_all(ours, ref, seed, split)
        rng = np.random.default_rng(seed)
        ix, iy = (np.sort(rng.choice(k, size=min(k, BOOTSTRAP_ROWS), replace=False)) for k in (n, m))
        small = self._compare_all({k: v[ix] for k, v in ours.items()}, {k: v[iy] for k, v in ref.items()}, seed, split)
        scale = self.scaler()
        value = kid_in_blocks(scale(ours[layers["kid"]]), scale(ref[layers["kid"]]), BOOTSTRAP_ROWS, seed)
        return Evaluation(self.extractor, self.extractor_id, split, n, m,
                          Estimate(value, value - (small.kid.value - small.kid.low), value + (small.kid.high - small.kid.value)),
                          Spread(frechet_distance(ours[layers["fid"]], ref[layers["fid"]]), small.fid.sd),
                          Spread(inception_score(ours[layers["isc"]]), small.inception_score.sd))

    def _compare_all(self, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], seed: int, split: str) -> Evaluation:
        layers, scale = self._layers(), self.scaler()
        x, y, logits = ours[layers["fid"]], ref[layers["fid"]], ours[layers["isc"]]
        n, m = len(x), len(y)
        fid = bootstrap_spread(lambda ix, iy: frechet_distance(x[ix], y[iy]), n, m, self.resamples, seed)
        score = bootstrap_spread(lambda ix, _: inception_score(logits[ix]), n, m, self.resamples, seed)
        return Evaluation(self.extractor, self.extractor_id, split, n, m, kid(scale(ours[layers["kid"]]), scale(ref[layers["kid"]])),
                          fid, score)

    def evaluate(self, samples: np.ndarray, seed: int = 0) -> Evaluation:
        """The metrics of ``samples`` (uint8 NHWC) against the reference split."""
        self._check(samples, "samples")
        return self.compare(self.features(samples), self.reference_features(), seed)

    def metrics(self, samples: np.ndarray, seed: int = 0) -> dict[str, float]:
        """evaluate() flattened: {kid_std_<extractor>: …, …_low, …_high, fid_<extractor>: …, …_sd, …, num_samples, num_reference}."""
        return self.evaluate(samples, seed).flat()

    def heldout_split(self) -> str:
        """The split of real images that the baselines compare with the reference: held out from training and from the
        classifier (validation; test when the reference is the validation split)."""
        return "test" if self.split == "validation" else "validation"

    def baselines(self, num_samples: int, seed: int = 0) -> dict[str, Evaluation]:
        """At up to ``num_samples``: real held-out images against the reference (heldout_real: what a model
        indistinguishable from the data scores at this count; neither the score network nor the classifier saw them;
        as many as the held-out split has) and a Gaussian fitted to the training split (gaussian: a weak model). Cached
        per extractor, count, seed and resample count."""
        held = self.heldout_split()
        _check_split(self.manifest, held)
        path = self.cache / f"baselines-{self.split}-{self.extractor}-{self.extractor_id}-{num_samples}-{seed}-{self.resamples}.json"
        if path.exists():
            try:
                return {k: Evaluation.from_record(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, TypeError, AttributeError, KeyError) as err:
                log.warning("ignoring unreadable baseline cache %s (%s); recomputing", path, type(err).__name__)
        log.info("baselines at %d samples against the %s split (cached in %s)", num_samples, self.split, self.cache)
        real, train = self.split_images(held), self.split_images("train")
        rng = np.random.default_rng(seed)
        real = real[np.sort(rng.permutation(len(real))[:num_samples])]
        out = {"heldout_real": self.evaluate(real, seed), "gaussian": self.evaluate(fitted_gaussian_samples(train, num_samples, rng), seed)}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({k: asdict(v) for k, v in out.items()})))
        return out

    def report(self, samples: np.ndarray, baseline_samples: int = 0, seed: int = 0) -> Report:
        """The samples' evaluation, with the baselines at ``baseline_samples`` (none when 0) and the extractor's record."""
        model = self.evaluate(samples, seed)
        dead = int((self.reference_features()[self._layers()["fid"]].std(0) == 0).sum())  # features constant on the reference
        return Report(model, self.baselines(baseline_samples, seed) if baseline_samples else {},
                      {**self.info, "extractor_dead_features": float(dead)})


def _check_split(manifest: Manifest, split: str) -> None:
    """An EvaluationError (one line) when the shard set has no such split."""
    try:
        manifest.split(split)
    except ShardError as err:
        raise EvaluationError(str(err)) from None


def _report(shards: str, samples: np.ndarray, extractor: str, inception_weights: dict[str, torch.Tensor] | None,
            cache_dir: str | None, resamples: int, use_gpu: bool, baseline_samples: int, seed: int) -> Report:
    evaluator = Evaluator(shards, extractor, inception_weights, cache_dir=Path(cache_dir) if cache_dir else None,
                          resamples=resamples, use_gpu=use_gpu)
    return evaluator.report(samples, baseline_samples, seed)


def evaluate_on_worker(shards: str, samples: np.ndarray, extractor: str = "classifier", inception_weights: str | None = None,
                       cache_dir: Path | None = None, resamples: int = 200, use_gpu: bool = False, baseline_samples: int = 0,
                       seed: int = 0, num_cpus: float = 1) -> Report:
    """Evaluator.report in a Ray task with the given resources (a GPU when ``use_gpu``): the samples go there through
    Ray's object store, the reference is read from ``shards`` (a path or URL) there, and only the report comes back.
    Inception weights given as a file are verified here, on the driver."""

    state = check_inception_weights(inception_weights) if inception_weights else None
    task = ray.remote(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0, max_retries=0)(_report)
    try:
        return ray.get(task.remote(shards, ray.put(samples), extractor, state, str(cache_dir) if cache_dir else None,
                                   resamples, use_gpu, baseline_samples, seed))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (EvaluationError, ValueError, OSError)):  # bad input or an unreadable location: one line
            raise err.cause from None
        raise


def fitted_gaussian_samples(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Samples of N(mean, covariance) of the images (full covariance through the data's SVD), as uint8."""
    x = images.reshape(len(images), -1).astype(np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    z = rng.standard_normal((n, len(s)))
    draws = mean + (z * s / np.sqrt(len(x) - 1)) @ vt
    return np.clip(np.rint(draws), 0, 255).astype(np.uint8).reshape((n,) + images.shape[1:])
