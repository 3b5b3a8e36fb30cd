"""The extra pass at each evaluation: feature diagnostics (``feat/``) and label-free
validators (``select/``).

Data: the held-out source validation split (``data.source_val_images``) and the target
validation split. Feature diagnostics and SND use a fixed set of images (the first
``DIAG_IMAGES`` of each split) and a fixed pixel sample chosen once, at the first evaluation,
with a fixed seed: every evaluation and every run compares the same pixels. Labels there only
measure; nothing here trains.

Under DDP the fixed sample is processed on every rank (replicas are identical, so are the
values); ``agreement`` and ``entropy`` sum over each rank's share of the target split and
``source_miou`` over its share of the source split, all-reduced.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from t2sda import dist, validators
from t2sda.config import Config
from t2sda.data.loaders import eval_loader
from t2sda.diagnostics import balanced_sample, feature_metrics
from t2sda.scoring import evaluate, iou_from_confusion, logits_of

DIAG_IMAGES = 16  # per domain
PER_CLASS = 64  # labelled pixels per class per domain
SND_PIXELS = 1024  # unlabelled target pixels for SND
EMBED_PER_DOMAIN = 500  # pixel features per domain in the TensorBoard projector
SAMPLE_SEED = 12_345  # fixed: the same pixels for every run


def _nearest(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _centre_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if not crop or (h <= crop and w <= crop):
        return x
    top, left = max(h - crop, 0) // 2, max(w - crop, 0) // 2
    return x[..., top:top + crop, left:left + crop]


class Monitor:
    """Call at each evaluation: ``metrics, per_class, embeddings = monitor(state)``.

    ``metrics``: class-averaged ``feat/<feature>/<metric>`` and ``select/<name>`` (for
    TensorBoard and metrics.jsonl); ``per_class``: ``feat/<feature>/<metric>/<class>``
    (TensorBoard only); ``embeddings``: feature name -> (pixels (n, D), [[domain, class]]).
    """

    def __init__(self, data, cfg: Config, device: torch.device):
        self.data, self.cfg, self.device = data, cfg, device
        self.diagnostics, self.validators = cfg.train.diagnostics, cfg.train.validators
        crop = cfg.data.eval_crop
        self.images: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for domain, dataset in (("source", data.source_val), ("target", data.val)):
            if dataset is None or not (self.diagnostics or self.validators):
                continue
            pairs = [dataset[i] for i in range(min(DIAG_IMAGES, len(dataset)))]
            # A label at another resolution than its image is first brought to the image's.
            self.images[domain] = [
                (_centre_crop(img, crop), _centre_crop(_nearest(lab, img.shape[-2:]), crop))
                for img, lab in pairs]
        self.index: dict[str, list[torch.Tensor]] = {}  # domain -> positions per image
        self.snd_index: list[torch.Tensor] | None = None
        # agreement count, pixels, entropy sum, pixels over this rank's share of the target
        # split, filled by observe() during the evaluation pass (or by a pass of its own)
        self.target_sums: torch.Tensor | None = None

    def observe(self, logits: dict[str, torch.Tensor]) -> None:
        """One batch of the target validation split: {"student": logits, "teacher": logits}
        (what ``evaluate(..., observe=monitor.observe)`` passes), folded into agreement and
        entropy, so the validators need no forward pass of their own."""
        if not self.validators:
            return
        agree, n = validators.agreement_count(logits["student"], logits["teacher"])
        ent, m = validators.entropy_sum(logits["student"])
        batch = torch.stack([agree.double(), torch.tensor(n, dtype=torch.float64, device=agree.device),
                             ent.double(), torch.tensor(m, dtype=torch.float64, device=ent.device)])
        self.target_sums = batch if self.target_sums is None else self.target_sums + batch

    @torch.no_grad()
    def __call__(self, state) -> tuple[dict, dict, dict]:
        student = dist.unwrap(state.student)
        student.eval()
        metrics, per_class, embeddings = {}, {}, {}
        tic = time.perf_counter()
        try:
            feats = {d: self._features(student, d) for d in self.images}
            if self.diagnostics and len(feats) == 2:
                self._diagnose(feats, metrics, per_class, embeddings)
            mid = time.perf_counter()
            if self.validators:
                metrics.update(self._validate(student, state.teacher, feats.get("target")))
        finally:
            student.train()
        # Seconds spent (the fixed-sample pass is counted with the diagnostics).
        metrics["perf/diagnostics_s"] = mid - tic
        metrics["perf/validators_s"] = time.perf_counter() - mid
        return metrics, per_class, embeddings

    def _features(self, student, domain: str) -> dict:
        """Decoder features (and projections) of the sampled pixels, their labels, and the
        softmax predictions at the SND pixels (target)."""
        flats, labels, probs = [], [], []
        for image, label in self.images[domain]:
            logits, feature = student.segmentor(image[None].to(self.device))
            feature = feature[0].float()
            flats.append(feature.flatten(1).T)  # (h*w, D)
            labels.append(_nearest(label, tuple(feature.shape[-2:])).reshape(-1).to(self.device))
            logits = F.interpolate(logits.float(), size=feature.shape[-2:], mode="bilinear",
                                   align_corners=False)
            probs.append(logits[0].softmax(0).flatten(1).T)
        if domain not in self.index:
            self._choose(domain, labels, [len(p) for p in probs])
        out = {"label": torch.cat([lab[i] for lab, i in zip(labels, self.index[domain])])}
        out["decoder"] = torch.cat([f[i] for f, i in zip(flats, self.index[domain])])
        proj = getattr(student, "proj", None)
        if proj is not None:
            out["proj"] = proj(out["decoder"]).float()
        if domain == "target":
            out["snd"] = torch.cat([p[i] for p, i in zip(probs, self.snd_index)])
        return out

    def _choose(self, domain: str, labels: list[torch.Tensor], sizes: list[int]) -> None:
        """The fixed pixel sample: class-balanced over the labelled pixels of all images."""
        gen = torch.Generator().manual_seed(SAMPLE_SEED + (domain == "target"))
        flat = torch.cat(labels).cpu()
        picked = balanced_sample(flat, per_class=PER_CLASS, num_classes=self.data.num_classes,
                                 generator=gen)
        self.index[domain] = self._split(picked, sizes)
        if domain == "target":
            total = sum(sizes)
            snd = torch.randperm(total, generator=gen)[:SND_PIXELS].sort().values
            self.snd_index = self._split(snd, sizes)

    def _split(self, positions: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        out, offset = [], 0
        for size in sizes:
            inside = positions[(positions >= offset) & (positions < offset + size)] - offset
            out.append(inside.to(self.device))
            offset += size
        return out

    def _diagnose(self, feats: dict, metrics: dict, per_class: dict, embeddings: dict) -> None:
        src, tgt, names = feats["source"], feats["target"], self.data.class_names
        gen = torch.Generator().manual_seed(SAMPLE_SEED)
        shown = {d: torch.randperm(len(feats[d]["label"]), generator=gen)[:EMBED_PER_DOMAIN]
                 for d in feats}
        for feature in ("decoder", "proj"):
            if feature not in src:
                continue
            results = feature_metrics(src[feature], src["label"], tgt[feature], tgt["label"],
                                      self.data.num_classes)
            for metric, (mean, values) in results.items():
                metrics[f"feat/{feature}/{metric}"] = mean
                # A class absent from the sample has no value: not logged (TB would warn).
                per_class.update({f"feat/{feature}/{metric}/{c}": v
                                  for c, v in zip(names, values.tolist(), strict=True)
                                  if math.isfinite(v)})
            pixels = torch.cat([feats[d][feature][shown[d].to(self.device)].cpu() for d in feats])
            meta = [[d, names[int(c)]] for d in feats
                    for c in feats[d]["label"][shown[d].to(self.device)].tolist()]
            embeddings[feature] = (pixels, meta)

    def _validate(self, student, teacher, target: dict | None) -> dict:
        cfg, out = self.cfg, {}
        batch = cfg.data.eval_batch_size or cfg.data.batch_size
        world = {"rank": dist.rank(), "world_size": dist.world_size()}
        crop, stride = cfg.data.eval_crop, cfg.data.eval_stride
        if self.data.source_val is not None:
            conf = evaluate({"student": student}, eval_loader(self.data.source_val, batch_size=batch,
                                                              **world),
                            num_classes=self.data.num_classes, device=self.device, crop=crop,
                            stride=stride)["student"]
            out["select/source_miou"] = 100 * iou_from_confusion(conf)[1].item()
        if self.target_sums is None:  # no evaluation pass shared its logits: a pass of its own
            for image, _ in eval_loader(self.data.val, batch_size=batch, **world):
                image = image.to(self.device)
                self.observe({name: logits_of(model, image, num_classes=self.data.num_classes,
                                              crop=crop, stride=stride)
                              for name, model in (("student", student), ("teacher", teacher))})
        sums, self.target_sums = self.target_sums, None
        dist.all_reduce_sum(sums)
        out["select/agreement"] = (sums[0] / sums[1]).item()
        out["select/entropy"] = (sums[2] / sums[3]).item()
        if target is not None:
            out["select/snd"] = validators.snd(target["snd"])
        return out


def with_best(metrics: dict, previous: dict, *, since: int = -1) -> dict:
    """``select/best_<name>``: each validator's best-so-far (in its direction), as
    ``val/best_mIoU`` is, over the evaluations after step ``since`` (the source-only warm-up's
    end): warm-up values are not carried, since every trial of a method search shares them
    (and an untrained net has the densest, most uncertain predictions). Until then the best is
    the current value."""
    carry = previous.get("step", -1) > since
    best = {}
    for name in validators.LABEL_FREE:
        key = f"select/{name}"
        if key in metrics:
            prev = previous.get(validators.best_key(name)) if carry else None
            value = metrics[key]
            best[validators.best_key(name)] = value if prev is None else \
                validators.better(name, prev, value)
    return best
