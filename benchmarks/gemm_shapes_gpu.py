"""Which cuBLAS call shape reads a half chunk fastest? (run on the GPU machine)

Times the pass's two contractions for the 50,000 x 1024 x 196 float16 case
(chunks of ~1 GiB) in several forms and prints GB/s of the chunk read.
"""

from __future__ import annotations

import torch

from benchmarks.bench_gpu import cuda_time

DEV = torch.device("cuda")


def main() -> None:
    b, width, r2 = 2600, 1024 * 196, 64
    x = torch.rand((b, width), device=DEV, dtype=torch.float16)
    kr = torch.rand((width, r2), device=DEV, dtype=torch.float16)
    a2 = torch.rand((b, r2), device=DEV, dtype=torch.float16)
    gb = x.numel() * 2 / 1e9
    rows = [("mm X@KR out f32", lambda: torch.mm(x, kr, out_dtype=torch.float32))]
    for nblk in (8, 32, 128):
        jb = width // nblk
        xv = x.view(b, nblk, jb).transpose(0, 1)
        krv = kr.view(nblk, jb, r2)
        rows.append(
            (
                f"bmm split-K {nblk}",
                lambda xv=xv, krv=krv: torch.bmm(xv, krv, out_dtype=torch.float32).sum(0),
            )
        )
    rows.append(("mm KR^T@X^T out f32", lambda: torch.mm(kr.T, x.T, out_dtype=torch.float32)))
    rows.append(("mm A^T@X out f32", lambda: torch.mm(a2.T, x, out_dtype=torch.float32)))
    rows.append(("copy X", lambda: x.clone()))
    for name, fn in rows:
        try:
            t = cuda_time(fn, repeats=10, warmup=2)
            print(f"{name:<24} {t * 1e3:7.3f} ms  {gb / t:7.0f} GB/s")
        except Exception as err:  # noqa: BLE001
            print(f"{name:<24} failed: {err}")


if __name__ == "__main__":
    main()
