"""SOFA and the brain-tuned LiteMedSAM against their baselines on the generalisation cases (issue 20).

    python benchmarks/sam_heads.py [--cases 1] [--groups G ...] [--margin 3] [--threads 2]
        [--store runs/sam_heads/eval] [--encode-only] [--out docs/sam_heads_results.json]

Cases: ``benchmarks/generalisation.py``'s groups (the synthesiser inside and outside its training
ranges, plus the demo generator's cases at 1 and 2 mm: another contrast model), ``--cases`` per
group, the same seeds as that benchmark. Every model runs through the library's engine:

- ``unet2d (default)``: the default automatic model;
- ``sofa auto``: the shipped SOFA without a box; ``sofa box``: with the drawn box;
- ``litemedsam zero-shot`` / ``litemedsam brain``: the published and the brain-tuned LiteMedSAM
  with the drawn box (FLAIR).

**The lesion slab.** SOFA costs four TinyViT encodes per slice (about 5 s on 2 cores), so every
model runs on the case's axial slices through the lesion +- ``--margin`` slices (the whole volume
is prepared first, so intensities are normalised as for the full case); a healthy case gets a
slab of 2 x margin + 1 slices through the middle of its brain, to count false positives. This is
what an ROI-driven or cascaded run sees; false positives farther from the lesion are not counted
here (``benchmarks/generalisation.py`` counts them for unet2d on whole volumes).

**The drawn box**: the whole tumour's bounding box on the slab grown by 3 voxels in-plane (on
every slice of the slab), what a user's ROI around the lesion gives.

Embeddings are computed once per slice and shared: SOFA's encoder output per modality is exactly
LiteMedSAM's per-slice embedding (same frozen TinyViT, same min-max input), so the LiteMedSAM runs
read SOFA's FLAIR embeddings. ``--store`` keeps them on disk per case (float32), so a rerun - or a
run with new weights - encodes nothing; ``--encode-only`` just fills the store (it needs no trained
weights: the encoder is the frozen base).

Printed per group and model: Dice WT (TC, ET for the BraTS-label models); the per-case rows and
the means go to ``--out`` (JSON) for docs/sam_heads.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from generalisation import groups, make_case, score  # noqa: E402

from BrainLesionSAMLib.catalogue import load_catalogue, resolve_method  # noqa: E402
from BrainLesionSAMLib.conventions import MODALITIES  # noqa: E402
from BrainLesionSAMLib.engine import Box, EmbeddingCache, InferenceEngine  # noqa: E402
from BrainLesionSAMLib.preprocessing import PreparedCase, prepare_case  # noqa: E402

FLAIR = MODALITIES.index("flair")
BOX_MARGIN_VOXELS = 3


def slab_of(case: PreparedCase, truth: np.ndarray, margin: int) -> tuple[PreparedCase, np.ndarray, tuple[int, int]]:
    """The case restricted to the lesion's axial slices +- margin (a healthy case: the brain's middle)."""
    lesion = np.flatnonzero(truth.any(axis=(1, 2)))
    if len(lesion):
        z0, z1 = int(lesion[0]) - margin, int(lesion[-1]) + margin + 1
    else:
        brain = case.brain_slices()
        middle = int(brain[len(brain) // 2])
        z0, z1 = middle - margin, middle + margin + 1
    z0, z1 = max(z0, 0), min(z1, truth.shape[0])
    slab = PreparedCase(images=case.images[:, z0:z1].copy(), available=case.available,
                        reference=case.reference[:, :, z0:z1], reference_modality=case.reference_modality,
                        brain_mask=case.brain_mask[z0:z1].copy(), sources=case.sources)
    return slab, truth[z0:z1], (z0, z1)


def drawn_box(truth: np.ndarray) -> Box | None:
    """The whole tumour's bounding box grown by BOX_MARGIN_VOXELS in-plane, over the whole slab."""
    if not truth.any():
        return None
    z, y, x = np.nonzero(truth)
    m = BOX_MARGIN_VOXELS
    return Box(int(x.min()) - m, int(y.min()) - m, 0, int(x.max()) + m, int(y.max()) + m,
               truth.shape[0] - 1).clipped_to(truth.shape)


class SharedEmbeddings(EmbeddingCache):
    """Per (case content, slice) the four modality embeddings SOFA encodes; a LiteMedSAM engine reads
    its FLAIR embedding from them (``readers``: id(method) -> modality index, or None for all four)."""

    def __init__(self, readers: dict[int, int | None]):
        super().__init__(max_bytes=1 << 62)
        self.readers = readers

    def get(self, key: tuple):
        method, _precision, fingerprint, z = key[:4]
        if len(key) != 4:
            return super().get(key)
        index = self.readers.get(method)
        stored = super().get((fingerprint, z))
        if stored is not None:
            return stored if index is None else stored[index]
        # without SOFA in the run, the LiteMedSAM variants share their one-modality embedding
        return super().get((fingerprint, z, index)) if index is not None else None

    def put(self, key: tuple, embedding: torch.Tensor) -> None:
        index = self.readers.get(key[0], -1)
        if len(key) == 4 and index is None:
            super().put((key[2], key[3]), embedding)
        elif len(key) == 4 and index != -1:
            super().put((key[2], key[3], index), embedding)
        else:
            super().put(key, embedding)

    def save(self, path: Path, fingerprint: str) -> None:
        slices = {f"z{key[1]}": value for key, value in self._entries.items()
                  if len(key) == 2 and key[0] == fingerprint}
        torch.save({"fingerprint": fingerprint, "slices": slices}, path)

    def load(self, path: Path, fingerprint: str) -> int:
        if not path.is_file():
            return 0
        stored = torch.load(path, weights_only=True)
        if stored["fingerprint"] != fingerprint:
            return 0
        for name, value in stored["slices"].items():
            super().put((fingerprint, int(name[1:])), value)
        return len(stored["slices"])


def labels_of(engine: InferenceEngine, case: PreparedCase, box: Box | None) -> np.ndarray:
    return sitk.GetArrayFromImage(engine.segment(case, box=box).labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1, help="cases per group")
    parser.add_argument("--groups", nargs="*", help="only these groups")
    parser.add_argument("--margin", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "sam_heads" / "eval")
    parser.add_argument("--encode-only", action="store_true", help="fill the embedding store, score nothing")
    parser.add_argument("--sofa", default=None, help="SOFA weights (file or catalogue id; default: the shipped ones)")
    parser.add_argument("--litemedsam", default=None,
                        help="brain-tuned LiteMedSAM weights (file or catalogue id; default: the shipped ones)")
    parser.add_argument("--no-sofa", action="store_true", help="leave SOFA out (e.g. while it ships no weights)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "sam_heads_results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.store.mkdir(parents=True, exist_ok=True)
    if args.encode_only:
        from BrainLesionSAMLib.methods.sofa import SOFA

        methods = {"sofa auto": SOFA().eval()}  # the encoder is the frozen base either way
    else:
        catalogue = load_catalogue()
        methods = {"unet2d (default)": resolve_method("unet2d", catalogue=catalogue)}
        if not args.no_sofa:
            methods["sofa auto"] = resolve_method("sofa", args.sofa, catalogue=catalogue)
            methods["sofa box"] = methods["sofa auto"]
        methods["litemedsam zero-shot"] = resolve_method("litemedsam", "litemedsam-v1", catalogue=catalogue)
        methods["litemedsam brain"] = resolve_method("litemedsam", args.litemedsam, catalogue=catalogue)
    readers = {id(methods["sofa auto"]): None} if "sofa auto" in methods else {}
    readers.update({id(m): FLAIR for name, m in methods.items() if name.startswith("litemedsam")})
    results: dict = {"cases_per_group": args.cases, "margin": args.margin, "groups": {}}
    for group, spec in groups().items():
        if args.groups and group not in args.groups:
            continue
        rows: dict[str, list] = {name: [] for name in methods}
        for index in range(args.cases):
            start = time.perf_counter()
            images, labels, info = make_case(group, index, spec)
            truth_full = sitk.GetArrayFromImage(labels)
            case, truth, (z0, z1) = slab_of(prepare_case(images), truth_full, args.margin)
            spacing = case.spacing_zyx
            box = drawn_box(truth)
            cache = SharedEmbeddings(readers)
            path = args.store / f"{group}_{index}.pt"
            cache.load(path, case.fingerprint)
            for name, method in methods.items():
                boxed = name.startswith("litemedsam") or name == "sofa box"
                if boxed and box is None:
                    continue  # no lesion, nothing to draw a box around
                engine = InferenceEngine(method, device="cpu", precision="fp32",
                                         embedding_cache=cache if method.facts.cacheable_embeddings else None)
                prediction = labels_of(engine, case, box if boxed else None)
                row = {"case": index, **info, "slab": [z0, z1], **score(prediction, truth, spacing)}
                if method.facts.label_set == "lesion":
                    row = {k: v for k, v in row.items() if k not in ("TC_dice", "ET_dice")}
                rows[name].append(row)
                if name == "sofa auto":
                    cache.save(path, case.fingerprint)
            print(f"{group} case {index} ({info['kind']}, slices {z0}-{z1 - 1}) {time.perf_counter() - start:.0f} s: "
                  + "  ".join(f"{name} WT {rows[name][-1].get('WT_dice', float('nan')):.2f}"
                              for name in methods if rows[name] and rows[name][-1]["case"] == index), flush=True)
        results["groups"][group] = {name: {"rows": r, "WT_dice": _mean(r, "WT_dice"), "TC_dice": _mean(r, "TC_dice"),
                                           "ET_dice": _mean(r, "ET_dice")} for name, r in rows.items()}
        if not args.encode_only:
            args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.encode_only:
        return 0
    results["mean"] = {name: {key: _mean([row for g in results["groups"].values() for row in g[name]["rows"]], key)
                              for key in ("WT_dice", "TC_dice", "ET_dice")} for name in methods}
    print("\nmean over the cases (lesion slabs):")
    for name, means in results["mean"].items():
        print(f"  {name:22s} " + "  ".join(f"{k[:2]} {v:.3f}" for k, v in means.items() if v is not None))
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return round(float(np.mean(values)), 3) if values else None


if __name__ == "__main__":
    sys.exit(main())
