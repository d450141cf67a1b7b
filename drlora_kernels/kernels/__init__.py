"""Triton kernels of the ``triton`` backend (launched from :mod:`drlora_kernels.ops.triton_impl`).

One file per kernel family; every file imports triton at its top, so import the
submodules only where triton is wanted. This package itself imports nothing, so
``import drlora_kernels`` keeps working on machines without triton.

* :mod:`.tiles`       -- device-side row-tile and row-chunk scheduling, the grouped tile order, the dot.
* :mod:`.shrink`      -- ``out[m, :r_e] = c_e * in[m] @ L[e, :r_e].T`` (forward ``u``, backward ``s dY B``).
* :mod:`.expand`      -- ``out[m] = in[m] @ W[e].T + c_e * v[m, :r_e] @ L[e, :, :r_e].T`` (base+expand, ``dX``).
* :mod:`.weight_grad` -- per-expert ``out[e] = c_e * left_e.T @ right_e`` (``dA``, ``dB``, ``dW``), row-split.
"""
