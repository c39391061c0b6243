"""``brainlesionsam-train``: train a method with one of the paper configs (or your own file).

    brainlesionsam-train --config cmaa data.root=/data/BraTS2021 train.batch_size=12
    torchrun --nproc_per_node 4 -m Training.train --config sofa data.root=/data/BraTS2020
    brainlesionsam-train --config unet2d_smoke             # a few CPU steps on generated cases
    brainlesionsam-train --config cmaa data.root=... --prepare-only   # cache + split file only
    brainlesionsam-train --export runs/cmaa --out cmaa_brats21.safetensors --url https://...
    brainlesionsam-train --list-configs
    brainlesionsam-train --config mome_experts data.root=...              # MoME stage 1: the experts
    brainlesionsam-train --config mome data.root=... --init-from runs/mome_experts   # stage 2

Overrides are ``section.key=value`` (JSON values). A run folder (``output.dir``, default
``runs/<config>``) that holds training checkpoints is resumed from its newest one, exactly where it
stopped; ``--no-resume`` refuses such a folder instead. ``--init-from RUN`` (config ``init_from``)
starts a new run from the weights of a finished run (its ``final.safetensors``, or a given
``.safetensors`` file): every tensor, loaded exactly; optimiser, schedule and step start afresh.
Exit status: 0 done, 1 a user error (the
message says what to do), 2 bad arguments, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from BrainLesionSAMLib.errors import BrainLesionSAMError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainlesionsam-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--config", help="packaged config name (see --list-configs) or a JSON file")
    action.add_argument("--export", type=Path, metavar="RUN_DIR", help="export a run to the release format")
    action.add_argument("--list-configs", action="store_true", help="list the packaged configs and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value (JSON value), e.g. train.max_steps=10")
    parser.add_argument("--prepare-only", action="store_true", help="prepare the cache and the split file, then stop")
    parser.add_argument("--no-resume", action="store_true", help="refuse a run folder that holds checkpoints")
    parser.add_argument("--init-from", type=Path, metavar="RUN",
                        help="start from the weights of a finished run folder (final.safetensors) or a .safetensors "
                             "file (a new run, not a resume; e.g. MoME's stage 2 from its experts' run)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    export = parser.add_argument_group("export")
    export.add_argument("--out", type=Path, help="release checkpoint to write (.safetensors)")
    export.add_argument("--which", default="best", choices=("best", "final", "last"),
                        help="best validation weights (default; final if never validated), final, or the last training checkpoint")
    export.add_argument("--id", dest="model_id", help="catalogue id (default <config>-<which>)")
    export.add_argument("--url", default="", help="where the file will be downloadable (catalogue entry)")
    export.add_argument("--licence", default="", help="licence of the weights (catalogue entry)")
    export.add_argument("--version", default="1", help="version of the weights (catalogue entry)")
    export.add_argument("--title", default=None, help="title shown in the Slicer panel (catalogue entry)")
    export.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GPU memory the weights need at inference (catalogue entry; default: a rough estimate)")
    export.add_argument("--delta", action="store_true",
                        help="store only the tensors training changed on the method's third-party base weights "
                             "(e.g. CMAA or SOFA on LiteMedSAM); the base is checked by sha256 on load")
    export.add_argument("--fp16", action="store_true",
                        help="store the weights as float16 (half the file; loading restores float32 networks)")
    return parser


def _list_configs() -> None:
    from BrainLesionSAMLib.methods import method_names

    from .config import CONFIG_DIR, _load_file, available_configs

    registered = set(method_names())
    for name in available_configs():
        raw = _load_file(CONFIG_DIR / f"{name}.json")
        state = "" if raw["method"] in registered else "  (method not registered in this installation)"
        print(f"{name:22s} method {raw['method']:12s} {raw.get('paper', '')[:60]}{state}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.list_configs:
            _list_configs()
            return 0
        if args.export is not None:
            from .export import export_run

            if args.out is None:
                raise BrainLesionSAMError("--export needs --out FILE.safetensors")
            if args.out.exists():
                raise BrainLesionSAMError(f"{args.out} already exists; choose another --out")
            entry = export_run(args.export, args.out, args.which, args.model_id, args.url, args.licence,
                               args.version, args.gpu_memory_gb, args.title, delta=args.delta,
                               storage="float16" if args.fp16 else "float32")
            print(json.dumps(entry, indent=1))
            print(f"wrote {args.out} and {args.out}.catalogue.json")
            return 0
        from .config import load_config
        from .trainer import Trainer

        overrides = list(args.overrides)
        if args.init_from is not None:   # absolute, so the run's config.json names it from anywhere
            overrides.append(f"init_from={json.dumps(str(args.init_from.absolute()))}")
        config = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(config, indent=1))
            return 0
        trainer = Trainer(config, resume=not args.no_resume)
        if args.prepare_only:
            from . import distributed
            from .config import method_class

            method_class(config)
            trainer.context = distributed.setup(config["train"])
            try:
                split = trainer.prepare_data()
            finally:
                distributed.teardown(trainer.context)
            print(f"cache {config['data']['cache']}, split {config['data']['splits']}: "
                  + ", ".join(f"{len(v)} {k}" for k, v in split.items()))
            return 0
        trainer.run()
        return 0
    except BrainLesionSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume by running the same command again", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
