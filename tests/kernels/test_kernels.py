"""runtime/language/kernels/ on this CPU: the batched matmul against ggml's dequantization, the Q4_0
repack, the bias + GELU epilogue, prompt attention, each path this CPU runs against plain C, and the
decoder's use of them.

Every op on the paths of other CPUs (NEON, and x86 without AVX-512): tests/kernels/test_kernel_paths.py
(under qemu)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from helpers.decoder_gguf import quantize
from kernel_cases import (
    OPS,
    attention_args,
    attention_inputs,
    build_cases,
    compile_harness,
    fp16_grid,
    harness_outputs,
    write_cases,
    x8_layout,
)

from tinygptv_edge.runtime.language.ggml_runtime import load_ggml
from tinygptv_edge.runtime.language.kernels import ops

_native = pytest.importorskip("tinygptv_edge.runtime.language.kernels._native")
PATHS = list(_native.SUPPORTED)  # 'plain' and the fast path this CPU runs, if any


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    ggml = load_ggml()
    traits = ggml.ggml_get_type_traits(getattr(ggml, f"GGML_TYPE_{type_name}"))
    out = np.empty(shape, np.float32)
    traits.contents.to_float(
        raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size
    )
    return out


def run(type_name: str, raw: np.ndarray, n: int, k: int, x: np.ndarray, path: str) -> np.ndarray:
    out = np.full((x.shape[0], n), np.nan, np.float32)
    tid = ops.TYPE_IDS[type_name]
    ldx = x.strides[0] // 4
    _native.matmul(tid, raw.ctypes.data, n, k, x.ctypes.data, x.shape[0], ldx, out.ctypes.data, n, path)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("type_name", "n", "k"), [("Q5_K", 24, 512), ("Q6_K", 8, 768)])
@pytest.mark.parametrize("t", [1, 16, 22, 37])  # one token; one block; a block and 6; two and 5
def test_matches_dequantized_weights(type_name, n, k, t, path):
    rng = np.random.default_rng(n + t)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.linspace(0.01, 0.2, k, dtype=np.float32)
    raw = quantize(w, type_name)
    x = rng.standard_normal((t, k + 5)).astype(np.float32)[:, :k]  # rows with a stride: ldx > k
    ref = x.astype(np.float64) @ dequantize(raw, type_name, (n, k)).T.astype(np.float64)
    got = run(type_name, raw, n, k, x, path)
    # the only approximation is int8 activations per 32 values: ~0.5% of the output scale
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max(), (type_name, t, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("type_name", list(ops.TYPE_IDS))
def test_error_within_the_rounding_bound(type_name, path):
    """Exact weights, int8 activations (one scale dx per 32 values, rounded to nearest): each output
    is off by at most sum over blocks of dx / 2 * sum |w| in the block."""
    n, k, t = 16, 512, 37
    rng = np.random.default_rng(5)
    raw = quantize(rng.standard_normal((n, k)).astype(np.float32), type_name)
    wd = dequantize(raw, type_name, (n, k)).astype(np.float64)
    x = rng.standard_normal((t, k)).astype(np.float32)
    dx = np.abs(x).reshape(t, k // 32, 32).max(-1) / 127  # (t, blocks)
    bound = (dx / 2) @ np.abs(wd).reshape(n, k // 32, 32).sum(-1).T  # (t, n)
    err = np.abs(run(type_name, raw, n, k, x, path) - x.astype(np.float64) @ wd.T)
    assert (err <= bound * 1.001 + 1e-4).all(), (type_name, path, (err / bound).max())


def test_fast_path_equals_plain_c_bit_for_bit():
    """Same IEEE operations in the same order (runtime/language/kernels/native.h): not close, identical."""
    if len(PATHS) < 2:
        pytest.skip(f"this CPU runs only the plain path (compiled: {_native.COMPILED})")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    for t in (40, 22, 24, 25, 9, 8, 1):  # last block of 8 or fewer tokens (AVX-512 pair lanes) or more
        x = rng.standard_normal((t, 512)).astype(np.float32)
        for type_name in ops.TYPE_IDS:
            raw = quantize(w, type_name)
            a, b = run(type_name, raw, 16, 512, x, "plain"), run(type_name, raw, 16, 512, x, PATHS[1])
            np.testing.assert_array_equal(b, a, err_msg=f"{type_name}, {t} tokens")


def test_active_path_is_reported():
    assert ops.active_path() == _native.PATH in _native.SUPPORTED
    assert set(_native.SUPPORTED) <= set(_native.COMPILED) and "plain" in _native.SUPPORTED
    assert ops.available() == (_native.PATH != "plain")


def test_rejects_what_it_cannot_compute():
    x = np.zeros((4, 256), np.float32)
    raw = quantize(np.ones((4, 256), np.float32), "Q5_K")
    with pytest.raises(ValueError, match="unsupported matmul"):
        run("Q5_K", raw, 4, 200, x, "plain")  # not whole super-blocks
    with pytest.raises(ValueError, match="unsupported matmul"):
        _native.matmul(8, raw.ctypes.data, 4, 256, x.ctypes.data, 4, 256, x.ctypes.data, 4, "plain")  # Q8_0
    other = {"avx512vnni", "neon-dotprod", "sse9"} - set(_native.SUPPORTED)
    for name in other:  # a path this CPU does not run (or that does not exist) is refused, not run
        with pytest.raises(ValueError, match="kernel path"):
            run("Q5_K", raw, 4, 256, x, name)


def _export(tiny, tmp_path, level: str):
    from helpers.wide import wide_source

    from tinygptv_edge.export.gguf.export import export_source

    return export_source(wide_source(tiny, seed=3)[1], tmp_path / "m.gguf", level).path


def _kernel_against_ggml(path, check) -> None:
    """A 40-token batch and one decode step with the kernel on and off (`check(dec, on)` looks at each
    decoder first): the logits must agree."""
    if not ops.available():
        pytest.skip(f"the runtime uses the kernel only on a fast path; this CPU runs {ops.active_path()}")
    from helpers.decoder_ref import kl_top1

    from tinygptv_edge.runtime.language.decoder import Decoder

    ids = np.random.default_rng(4).integers(0, 512, 40).tolist()
    logits = {}
    for on in (True, False):
        with Decoder(path, n_ctx=64, n_threads=2, kquant=on) as dec:
            check(dec, on)
            batch = dec.eval_tokens(ids, all_logits=True)
            logits[on] = np.concatenate([batch, dec.eval_tokens(ids[:1])[None]])
    kl, top1 = kl_top1(logits[False], logits[True])
    assert kl < 1e-3 and top1 >= 0.95, (kl, top1)


def test_decoder_uses_it_and_agrees_with_ggml(tiny, tmp_path):
    """A Q4_K_M model (Q5_K attn_qkv, Q6_K in ffn_down): a 40-token batch through the custom op
    against ggml's own kernels; decode steps (1 token) stay on ggml's."""

    def check(dec, on):
        used = dec._w.kquant
        assert bool(used) == on and all(
            n.endswith(("attn_qkv.weight", "ffn_down.weight", "output.weight")) for n in used
        )

    _kernel_against_ggml(_export(tiny, tmp_path, "Q4_K_M"), check)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [1, 2, 8, 9, 16, 22, 37])  # passes of up to 8 tokens on AVX-512
@pytest.mark.parametrize("n", [24, 48])  # 16-row stripes on AVX-512: one and a half, three
def test_q4_0_in_ggmls_repacked_layout_equals_plain_rows(n, t, path):
    k = 320  # groups of 8 rows (two 4-row tiles each in plain C), 10 blocks per row
    rng = np.random.default_rng(t)
    raw = quantize(rng.standard_normal((n, k)).astype(np.float32), "Q4_0")
    x = rng.standard_normal((t, k)).astype(np.float32)
    x8 = x8_layout(raw, n, k)
    assert x8.nbytes == raw.nbytes and not np.array_equal(x8, raw.reshape(-1))
    out = np.full((t, n), np.nan, np.float32)
    _native.matmul(_native.Q4_0_X8, x8.ctypes.data, n, k, x.ctypes.data, t, k, out.ctypes.data, n, path)
    np.testing.assert_array_equal(out, run("Q4_0", raw, n, k, x, path))
    with pytest.raises(ValueError, match="unsupported matmul"):  # the repack needs whole 8-row groups
        _native.matmul(_native.Q4_0_X8, x8.ctypes.data, 20, k, x.ctypes.data, t, k, out.ctypes.data, n, path)


def test_decoder_sends_repacked_q4_0_batches_here_and_agrees_with_ggml(tiny, tmp_path):
    """A Q4_0 model repacked by ggml: the layout is confirmed against ggml's own repack buffer, batches
    of at least MIN_TOKENS come here, decode steps stay on ggml's repacked gemv."""

    def check(dec, on):
        q40 = {n for n in dec.repacked if dec._w.tensors[n].contents.type == ops.TYPE_IDS["Q4_0"]}
        if on and _native.PATH == "avx512vnni":  # x86: ggml repacks Q4_0 8 rows at a time
            assert q40 and all(dec._w.kquant[n] == _native.Q4_0_X8 for n in q40)
        if not on:
            assert not dec._w.kquant

    _kernel_against_ggml(_export(tiny, tmp_path, "Q4_0"), check)


def test_every_prompt_batch_of_repacked_q4_0_comes_here_and_is_the_same_in_any_batch(tiny, tmp_path):
    """Q4_0 in ggml's x86 layout: every batch of a prompt (its last one of 1 position too) goes through
    the kernel, decode steps do not; a prompt position's logits then do not depend on its batch."""
    if _native.PATH != "avx512vnni":
        pytest.skip(f"ggml repacks Q4_0 in the kernel's 8-row layout on x86-64; this CPU runs {_native.PATH}")
    from tinygptv_edge.runtime.language.decoder import Decoder

    ids = np.random.default_rng(5).integers(0, 512, 11).tolist()
    with Decoder(_export(tiny, tmp_path, "Q4_0"), n_ctx=64, n_threads=2, n_batch=5) as dec:
        full = dec.eval_tokens(ids, all_logits=True)  # batches of 5, 5 and 1
        for start in (3, len(ids) - 2):  # 5 and 3 positions; the last 2 (a prompt from the prefix cache)
            dec.truncate(start)
            np.testing.assert_array_equal(dec.eval_tokens(ids[start:], all_logits=True), full[start:])
        dec.eval_tokens(ids[:1])  # a decode step
        kernel = {key[0]: bool(g.kq and g.kq.nodes) for key, g in dec._graphs.items() if key[4]}
        decode = [bool(g.kq and g.kq.nodes) for key, g in dec._graphs.items() if not key[4]]
        attention = {(key[0], key[4]): bool(g.kq and g.kq.attn) for key, g in dec._graphs.items()}
    assert kernel == {5: True, 1: True, 3: True, 2: True} and decode == [False]
    # prompts' attention through the kernel too; a decode step's through its one-query op
    assert attention == {
        (5, True): True,
        (1, True): True,
        (3, True): True,
        (2, True): True,
        (1, False): True,
    }


def test_an_unknown_repack_layout_keeps_ggmls_kernels(tiny, tmp_path):
    from tinygptv_edge.runtime.language.decoder import Decoder

    path = _export(tiny, tmp_path, "Q4_0")
    with Decoder(path, n_ctx=64, n_threads=1, kquant=False) as dec:
        w, names = dec._w.tensors, dec.repacked
        ggml = load_ggml()
        assert ops.repacked_q4_0(ggml, lambda n, nbytes: bytes(nbytes), w, names) == {}
        found = ops.repacked_q4_0(ggml, dec._file_bytes, w, names)
        q40 = {n for n in names if w[n].contents.type == ops.TYPE_IDS["Q4_0"]}
        assert set(found) == (q40 if _native.PATH == "avx512vnni" else set())  # aarch64 repacks 4 rows


@pytest.mark.parametrize("act", [0, 1])
def test_epilogue_adds_the_bias_and_applies_gelu_alike_on_every_path(act):
    x = fp16_grid()
    n = 16 * 5 + 3  # a masked tail on AVX-512
    x = np.resize(x, (-(-len(x) // n) * n,)).reshape(-1, n)
    bias = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    outs = {}
    for path in PATHS:
        o = x.copy()
        _native.epilogue(o.ctypes.data, n, o.shape[0], n, bias.ctypes.data, act, path)
        outs[path] = o
    for o in outs.values():
        np.testing.assert_array_equal(o, outs["plain"])
    if act == 0:
        np.testing.assert_array_equal(outs["plain"], x + bias)


def test_gelu_equals_ggmls_at_every_fp16_value():
    """The op's GELU against ggml_gelu on the same inputs: bit for bit on x86-64 (same table, same
    rounding); elsewhere the compiler may fuse ggml's table otherwise, within one fp16 step."""
    import platform

    from tinygptv_edge.runtime.language.ggml_runtime import new_context

    x = fp16_grid()
    ggml = load_ggml()
    backend = ggml.ggml_backend_cpu_init()
    ctx = new_context(ggml, 4, 8)
    galloc = None
    try:
        t = ggml.ggml_new_tensor_1d(ctx, ggml.GGML_TYPE_F32, len(x))
        ggml.ggml_set_input(t)
        y = ggml.ggml_gelu(ctx, t)
        ggml.ggml_set_output(y)
        gf = ggml.ggml_new_graph_custom(ctx, 8, False)
        ggml.ggml_build_forward_expand(gf, y)
        galloc = ggml.ggml_gallocr_new(ggml.ggml_backend_cpu_buffer_type())
        assert ggml.ggml_gallocr_alloc_graph(galloc, gf)
        ggml.ggml_backend_tensor_set(t, x.ctypes.data, 0, x.nbytes)
        assert ggml.ggml_backend_graph_compute(backend, gf) == 0
        want = np.empty_like(x)
        ggml.ggml_backend_tensor_get(y, want.ctypes.data, 0, want.nbytes)
    finally:
        if galloc is not None:
            ggml.ggml_gallocr_free(galloc)
        ggml.ggml_free(ctx)
        ggml.ggml_backend_free(backend)
    got = x.copy()
    _native.epilogue(got.ctypes.data, len(x), 1, len(x), 0, _native.ACT_GELU, _native.PATH)
    if platform.machine() in ("x86_64", "AMD64"):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2**-10, atol=2**-24)


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("D", [80, 20])  # Phi-2's head; one with a masked tail on AVX-512
def test_prompt_attention_matches_float64_and_every_path_alike(kv, D):
    """The prompt attention op (attention.c) on cache-like views (query heads interleaved with key heads,
    slots of all heads in a row, a causal mask after 30 cached positions and 256 slots, as the graph has)."""
    inp = attention_inputs(D, kv)
    H, T, n_kv, qk, k, v, mask = (inp[key] for key in ("H", "T", "n_kv", "qk", "k", "v", "mask"))
    outs = {}
    for path in PATHS:
        out = np.full((T, H, D), np.nan, np.float32)
        a = attention_args(inp, out)
        _native.attention(ctypes.addressof(a), path)
        outs[path] = out
    ref = np.empty((T, H, D))
    for t in range(T):
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            s = qk[t, h].astype(np.float64) @ k[:, cols].astype(np.float64).T * D**-0.5 + mask[t]
            p = np.exp(s - s.max())
            ref[t, h] = p @ v[:, cols].astype(np.float64) / p.sum()
    np.testing.assert_allclose(outs["plain"], ref, rtol=0, atol=2e-6)
    for o in outs.values():
        np.testing.assert_array_equal(o, outs["plain"])
    a.D = 300  # past the kernel's head size
    with pytest.raises(ValueError, match="bad arguments"):
        _native.attention(ctypes.addressof(a), "plain")


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize(("D", "p0"), [(80, 100), (20, 47), (80, 1499)])  # 16-slot tails; a long context
def test_decode_attention_matches_float64_and_every_path_alike(kv, D, p0):
    """The decode attention op (one query per head, read straight from cache-like rows) against float64,
    and every path this CPU runs against plain C bit for bit; T other than 1 is refused."""
    inp = attention_inputs(D, kv, H=4, T=1, n_kv=max(256, p0 + 37), p0=p0)
    H, qk, k, v, mask = (inp[key] for key in ("H", "qk", "k", "v", "mask"))
    outs = {}
    for path in PATHS:
        out = np.full((1, H, D), np.nan, np.float32)
        a = attention_args(inp, out)
        _native.attention1(ctypes.addressof(a), path)
        outs[path] = out
    ref = np.empty((1, H, D))
    for h in range(H):
        cols = slice(h * D, (h + 1) * D)
        s = qk[0, h].astype(np.float64) @ k[:, cols].astype(np.float64).T * D**-0.5 + mask[0]
        p = np.exp(s - s.max())
        ref[0, h] = p @ v[:, cols].astype(np.float64) / p.sum()
    np.testing.assert_allclose(outs["plain"], ref, rtol=0, atol=2e-6)
    for o in outs.values():
        np.testing.assert_array_equal(o, outs["plain"])
    a.T = 2
    with pytest.raises(ValueError, match="attention1: bad arguments"):
        _native.attention1(ctypes.addressof(a), "plain")


def test_decode_steps_through_the_one_query_op_match_ggmls_flash_attention(tiny, tmp_path):
    """A decode step's attention through kernels/ (where the CPU's path has its own) against ggml's
    one-query flash attention on the same cache: the logits of a few greedy steps agree within ggml's
    fp16 rounding of q and of the V sum, and the same tokens are chosen."""
    if not ops.decode_attention_available():
        pytest.skip(f"no decode attention of its own on this CPU's path ({_native.PATH})")
    from tinygptv_edge.runtime.language.decoder import Decoder

    path = _export(tiny, tmp_path, "F32")
    ids = np.random.default_rng(3).integers(0, 512, 20).tolist()
    runs = {}
    for own in (True, False):
        with Decoder(path, n_ctx=64, n_threads=2) as dec:
            dec._w.kquant_decode_attention = own
            logits, tok = [dec.eval_tokens(ids)], None
            for _ in range(6):
                tok = int(np.argmax(logits[-1]))
                logits.append(dec.eval_tokens([tok]))
            runs[own] = np.stack(logits[1:])
            steps = [g for key, g in dec._graphs.items() if not key[4]]
            assert steps and all(bool(g.kq and g.kq.attn) == own for g in steps)
    np.testing.assert_allclose(runs[True], runs[False], rtol=0, atol=2e-3 * np.abs(runs[False]).max())
    np.testing.assert_array_equal(runs[True].argmax(-1), runs[False].argmax(-1))


def test_harness_runs_every_op_and_splits_it_over_threads_as_the_module_does(tmp_path):
    """tests/kernels/harness.c built for this CPU (the emulated CPUs: test_kernel_paths.py): it picks
    the module's path, its plain and detected outputs are the module's, and each op split over threads
    as ggml runs it (the custom ops) gives the single thread's output."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("needs a C compiler")
    exe = compile_harness(cc, tmp_path / "harness")
    cases = build_cases(_native)
    write_cases(tmp_path / "in.bin", cases)
    args = [str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = dict(line.split("=", 1) for line in proc.stdout.split())
    assert info["path"] == _native.PATH and info["compiled"].split(",") == list(_native.COMPILED)
    assert [info[op] for op in OPS] == [str(sum(c["op"] == op for c in cases)) for op in OPS]
    for c, (plain, active, threads) in zip(cases, harness_outputs(tmp_path / "out.bin", cases), strict=True):
        np.testing.assert_array_equal(plain, c["ref"]["plain"], err_msg=c["label"])
        np.testing.assert_array_equal(active, c["ref"][_native.PATH], err_msg=c["label"])
        np.testing.assert_array_equal(threads, active, err_msg=f"{c['label']} on 3 threads")
