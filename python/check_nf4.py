"""Compares tuna's NF4 quantisation with bitsandbytes' for the same weights.

Usage: check_nf4.py DIR. DIR/nf4.safetensors holds, per case `<c>`: `<c>.weight` (the fp32
weight), tuna's `<c>.packed` (uint8 codes, two per byte), `<c>.absmax` (fp32, no double
quantisation), and with double quantisation `<c>.dq_packed`, `<c>.dq_codes` (uint8),
`<c>.dq_scales` (fp32), `<c>.dq_offset` (fp32 [1]) and `<c>.dq_dequantized` (tuna's fp32
dequantised weight). Prints one JSON object per case.

bitsandbytes' CPU kernel for the 8-bit absmax codes searches the 256-value map approximately:
may take a neighbour of the nearest value (0.1-0.2% of codes, mostly in the dense region near
zero). So tuna's codes are checked equal to bitsandbytes' reference implementation
(`backends/default/ops.py`: the nearest value, by `bucketize` over the map's midpoints, as
below), and against the CPU kernel's: where they differ, adjacent, tuna's the nearer
(`dq_tie_margin`: the worst distance difference as a fraction of the gap).
"""

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

warnings.filterwarnings("ignore")
import bitsandbytes.functional as F  # noqa: E402

t = load_file(str(Path(sys.argv[1]) / "nf4.safetensors"))
cases = sorted({k.split(".")[0] for k in t})
code8 = F.create_dynamic_map(signed=True)
for c in cases:
    w = t[f"{c}.weight"]
    n = w.numel()
    out = {"case": c, "numel": n}
    q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = q.reshape(-1)
    mine = t[f"{c}.packed"]
    # tuna pads with zero codes to whole blocks of 64; bitsandbytes to an even count.
    out["packed_equal"] = bool(torch.equal(mine[: q.numel()], q))
    out["absmax_equal"] = bool(torch.equal(t[f"{c}.absmax"], s.absmax))
    out["dequantized_max_diff"] = float(
        (F.dequantize_4bit(q.reshape(-1, 1), s) - w).abs().max()
    )

    q2, s2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out["dq_packed_equal"] = bool(torch.equal(t[f"{c}.dq_packed"][: q2.numel()], q2.reshape(-1)))
    out["dq_offset_equal"] = bool(float(t[f"{c}.dq_offset"][0]) == float(s2.offset))
    out["dq_scales_equal"] = bool(torch.equal(t[f"{c}.dq_scales"], s2.state2.absmax))
    # bitsandbytes' reference `quantize_blockwise` (backends/default/ops.py), on the same input.
    centred = (s.absmax - s2.offset).float()
    nb = centred.numel()
    ref = []
    for b0 in range(0, nb, 256):
        blk = centred[b0 : b0 + 256]
        am = blk.abs().max().clamp(min=1e-38)
        sc = torch.clamp(blk * (1.0 / am) if blk.numel() == 256 else blk / am, -1, 1)
        ref.append(torch.bucketize(sc, (code8[:-1] + code8[1:]) / 2, out_int32=True).to(torch.uint8))
    out["dq_codes_equal_reference"] = bool(torch.equal(torch.cat(ref), t[f"{c}.dq_codes"]))
    theirs = s2.absmax.reshape(-1)
    ours = t[f"{c}.dq_codes"]
    differ = (theirs != ours).nonzero().reshape(-1)
    # Where the codes differ, both must be neighbours with the value at their midpoint.
    absmax = t[f"{c}.absmax"] - s2.offset
    ties_ok = True
    worst = 0.0
    for i in differ.tolist():
        v = float(absmax[i] / s2.state2.absmax[i // 256])
        a, b = float(code8[int(ours[i])]), float(code8[int(theirs[i])])
        gap = abs(a - b)
        ties_ok &= abs(int(ours[i]) - int(theirs[i])) == 1
        worst = max(worst, abs(abs(v - a) - abs(v - b)) / gap)
        ties_ok &= abs(v - a) <= abs(v - b) + 1e-12  # tuna's is the nearer
    out["dq_codes_differing"] = len(differ)
    out["dq_tie_margin"] = worst
    out["dq_near_ties_ok"] = bool(ties_ok)
    out["dq_codes_fraction_equal"] = 1.0 - len(differ) / max(1, ours.numel())
    # bitsandbytes' dequantisation of its own state against tuna's of tuna's.
    # (over the blocks whose absmax codes agree).
    diff = (F.dequantize_4bit(q2, s2).reshape(-1) - t[f"{c}.dq_dequantized"].reshape(-1)).abs()
    same = torch.ones(ours.numel(), dtype=torch.bool)
    same[differ] = False
    same = same.repeat_interleave(64)[:n]
    out["dq_dequantized_max_diff"] = float(diff[same].max())
    print(json.dumps(out), flush=True)
