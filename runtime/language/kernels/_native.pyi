"""Types of the C extension module built from runtime/language/kernels/*.c (module.c): addresses and
pointers are ints, a path is 'plain' or PATH."""

PATH: str  # the path this CPU runs: 'avx512vnni', 'neon-dotprod' or 'plain'
SUPPORTED: tuple[str, ...]  # 'plain' and PATH
COMPILED: tuple[str, ...]  # the paths this build holds
ROWS: int
QK: int
Q4_0_X8: int
ACT_GELU: int

def op_address() -> int: ...
def attn_op_address() -> int: ...
def matmul(
    type: int, w: int, n: int, k: int, x: int, t: int, ldx: int, out: int, ldo: int, path: str, /
) -> None: ...
def epilogue(out: int, ldo: int, t: int, n: int, bias: int, act: int, path: str, /) -> None: ...
def attention(args: int, path: str, /) -> None: ...
