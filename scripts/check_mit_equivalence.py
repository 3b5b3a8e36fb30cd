"""SegFormer's MiT vs t2sda's timm encoder, and DAFormer's head vs ours, on random weights.

For each MiT size, builds transformers' SegformerForImageClassification (random weights, no
download), saves it with save_pretrained (the model hub's names) and as SegFormer's own
mmseg names (``mit_b*.pth``), loads each file through ``model.pretrained``'s loader into the
timm encoder (pvt_v2_b5 for MiT-B5, as in daformer_mitb5) and reports the max abs difference of
the four stage features. Then DAFormer's head (its mmseg tensor names) against ours.

    .venv/bin/python scripts/check_mit_equivalence.py --out results/mit_equivalence
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.mit_reference: the reference networks the tests use

from t2sda.models import convert  # noqa: E402
from t2sda.models.daformer import DAFormerHead  # noqa: E402
from tests import mit_reference as ref  # noqa: E402


def head_error(size: tuple[int, int]) -> float:
    channels = (64, 128, 320, 512)
    state = ref.daformer_head_state(channels, 19)
    mmseg_head = {k.removeprefix("decode_head."): v for k, v in state.items()}
    head_state, source = convert.convert_daformer_head(mmseg_head)
    head = DAFormerHead(channels, 19).eval()
    convert.check_state(head.state_dict(), head_state, source)
    head.load_state_dict(head_state)
    features = [torch.randn(1, c, size[0] // 4 // 2**i, size[1] // 4 // 2**i) for i, c in enumerate(channels)]
    with torch.no_grad():
        ours, _ = head(features)
    return (ours - ref.daformer_head_forward(state, features)).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["mit_b0", "mit_b5"], choices=sorted(ref.MIT))
    parser.add_argument("--image", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--out", type=Path, default=Path("results/mit_equivalence"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: --out {args.out}: not writable ({err.strerror})", file=sys.stderr)
        return 2
    size = tuple(args.image)
    rows = []
    print(f"{'model':<8} {'file':<6} {'stage 1':>9} {'stage 2':>9} {'stage 3':>9} {'stage 4':>9}  time")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            for fmt in ("hf", "mmseg"):
                start = time.perf_counter()
                errors = ref.stage_errors(name, fmt, torch.randn(2, 3, *size), Path(tmp))
                seconds = time.perf_counter() - start
                rows.append({"model": name, "format": fmt, "max_abs_error": errors})
                print(f"{name:<8} {fmt:<6} " + " ".join(f"{e:9.2e}" for e in errors) + f"  {seconds:.0f} s",
                      flush=True)
    head = head_error(size)
    print(f"DAFormer head (mmseg names -> DAFormerHead): max abs error {head:.2e}")
    result = {"image": list(size), "backbone": rows, "daformer_head_max_abs_error": head,
              "torch": torch.__version__, "platform": platform.platform(),
              "command": "python scripts/check_mit_equivalence.py " + " ".join(sys.argv[1:])}
    (args.out / "equivalence.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'equivalence.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
