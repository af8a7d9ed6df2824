#!/usr/bin/env bash
# The torch-free runtime on aarch64 (Raspberry-Pi class) under qemu-user emulation: `make test-aarch64`.
#
# On an x86_64 Debian host, as root (the host needs binfmt_misc, chroot and mounts):
#   1. host tools (qemu-user-static, binfmt-support, debootstrap, zstd) and the qemu-aarch64 binfmt entry;
#   2. an arm64 Debian userland made by debootstrap from the host's own apt mirror (cached);
#   3. per emulated CPU (AARCH64_CPUS, default "cortex-a76 cortex-a72": Raspberry Pi 5 and Pi 4):
#      an ARM /proc/cpuinfo bind-mounted over the chroot's, ggml-python built from its sdist by pip on
#      that CPU (cached wheel), a venv with the project installed from this clone (`pip install .`, no
#      extras), the torch-free test tier (`pytest tests/`: every torch test skips), the measurements
#      on the committed exports (tests/helpers/shipped_data.py) and the demo answer (`tinygptv-edge run --json`
#      on the x86-made tests/data exports, compared with the PyTorch reference's golden answer).
# Fails when any of that fails. Skips (exit 0, with a message) only where the qemu-aarch64 binfmt entry
# cannot be registered; AARCH64_REQUIRED=1 turns that skip into a failure.
#
# Cache (outside the clone; AARCH64_CACHE, default ~/.cache/tinygptv-edge/aarch64), each entry keyed
# by what it is made from:
#   root-<key>/          the userland: suite + package list + ROOTFS_VERSION
#   wheels/<key>/        the ggml-python wheel: version + CMAKE_ARGS + compiler + emulated CPU
#   pip/                 pip's download cache (wheels from PyPI); ggml-python itself is always built
#                        with --no-cache-dir (pip's wheel cache is keyed by the sdist alone and would
#                        hand back a ggml built for another CPU or other CMAKE_ARGS)
# Results (logs, measure-<cpu>.json, run-<cpu>.json, timings.txt) go to build/aarch64/ in the clone.
# Timings are emulated: they bound CI time and say nothing about a board's speed.
set -euo pipefail

SCRIPT_VERSION=1
ROOTFS_VERSION=1 # bump when the userland must be remade for reasons the key does not see
SUITE=bookworm
# python3-dev and a C compiler for runtime/language/kernels/*.c, g++ for ggml. No Debian cmake: ggml-python's build
# backend (scikit-build-core) then takes cmake and ninja wheels from PyPI, and the userland skips the
# ~60 packages cmake and build-essential pull in (icu, curl, perl, ...), which debootstrap would unpack
# and configure under emulation.
PACKAGES=python3,python3-venv,python3-dev,gcc,g++,make,libc6-dev,ca-certificates
REPO=${AARCH64_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
CACHE=${AARCH64_CACHE:-$HOME/.cache/tinygptv-edge/aarch64}
CPUS=${AARCH64_CPUS:-cortex-a76 cortex-a72}
OUT=$REPO/build/aarch64
GGML_PY=$(sed -n 's/.*"ggml-python==\([0-9.]*\)".*/\1/p' "$REPO/pyproject.toml")
GGML_CMAKE_ARGS=${AARCH64_GGML_CMAKE_ARGS:-} # more CMAKE_ARGS for the ggml build
GGML_BUILD=${AARCH64_GGML_BUILD:-cross}     # cross | emulated (see step 3)
# the -march a board's own `pip install` gets from ggml's native probe (GGML_NATIVE): Cortex-A76 (Pi 5)
# is ARMv8.2 with dotprod and fp16 arithmetic, no i8mm/SVE; Cortex-A72 (Pi 4's BCM2711) is ARMv8.0
# with CRC and no crypto extensions
declare -A ARM_ARCH=([cortex-a76]=armv8.2-a+dotprod+fp16 [cortex-a72]=armv8-a+crc)

T_START=$(date +%s)
C_START=0
log() { printf '== [%s +%4ds] %s\n' "$(date +%T)" $(($(date +%s) - T_START)) "$*"; }
# wall time, and the CPU time (user + sys) of the finished child processes: under emulation nearly all
# of it is qemu's, and unlike wall time it hardly depends on what else the machine runs
cpu_s() { # sets CPU_S: `times` in this shell (in a $(...) subshell it would see no children)
    times >"$OUT/.times"
    CPU_S=$(awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] } printf "%d", s }' "$OUT/.times")
}
start() {
    t0=$(date +%s)
    cpu_s
    c0=$CPU_S
}
timing() { # timing LABEL [since-wall since-cpu]
    cpu_s
    printf '%-40s %5d s wall %5d s CPU\n' "$1" $(($(date +%s) - ${2:-$t0})) $((CPU_S - ${3:-$c0})) \
        | tee -a "$OUT/timings.txt"
}
skip() {
    echo "SKIPPED test-aarch64: $*" >&2
    [ "${AARCH64_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
}
die() {
    echo "FAILED test-aarch64: $*" >&2
    exit 1
}

[ -n "$GGML_PY" ] || die "no ggml-python==X pin found in pyproject.toml"
if [ "$(id -u)" != 0 ]; then
    # binfmt registration, chroot and mounts need root
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo -n --preserve-env=AARCH64_REPO,AARCH64_CACHE,AARCH64_CPUS,AARCH64_REQUIRED,AARCH64_GGML_CMAKE_ARGS \
            HOME="$HOME" bash "$0" "$@"
    fi
    skip "root (or passwordless sudo) is needed to register the qemu-aarch64 binfmt entry and chroot"
fi
[ "$(uname -m)" = x86_64 ] || skip "this script emulates aarch64 on an x86_64 host; this is $(uname -m)"

mkdir -p "$OUT" "$CACHE"
: >"$OUT/timings.txt"
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) at the start" | tee -a "$OUT/timings.txt"
exec 9>"$CACHE/lock"
flock -w 3600 9 || die "another test-aarch64 holds $CACHE/lock"

# ---- 1. host tools + binfmt ----------------------------------------------------------------------
apt_install() { # the dpkg lock may be held by someone else for a while
    local i
    for i in 1 2 3 4 5 6; do
        if apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends "$@" >"$OUT/apt.log" 2>&1; then return 0; fi
        echo "apt-get failed (try $i; dpkg lock?), retrying in 20 s" >&2
        sleep 20
    done
    tail -20 "$OUT/apt.log" >&2
    return 1
}
start
HOST_PKGS=(qemu-user-static binfmt-support debootstrap zstd python3-venv)
[ "$GGML_BUILD" = cross ] && HOST_PKGS+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v update-binfmts >/dev/null || ! command -v zstd >/dev/null \
    || { [ "$GGML_BUILD" = cross ] && ! command -v aarch64-linux-gnu-g++ >/dev/null; }; then
    log "host: apt-get install ${HOST_PKGS[*]}"
    command -v apt-get >/dev/null || skip "no apt-get: install ${HOST_PKGS[*]} by hand"
    apt_install "${HOST_PKGS[@]}" || die "apt-get install failed"
fi
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e $BINFMT/register ]; then
    mount -t binfmt_misc binfmt_misc $BINFMT 2>/dev/null \
        || skip "binfmt_misc cannot be mounted here (a container without it?): qemu-aarch64 cannot be registered"
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
# flag F: the kernel opens qemu at registration, so the chroot needs no copy of it
if ! grep -qx enabled $BINFMT/qemu-aarch64 2>/dev/null || ! grep -q '^flags:.*F' $BINFMT/qemu-aarch64; then
    skip "the qemu-aarch64 binfmt entry could not be registered (with flag F) in $BINFMT"
fi
timing "host tools + binfmt"

# ---- 2. the arm64 userland (cached; debootstrap's second stage runs emulated) ---------------------
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }
ROOT=$CACHE/root-$(key "$SUITE" "$PACKAGES" "$ROOTFS_VERSION")
mounted_under() { findmnt -rn -o TARGET | grep -q "^$1\(/\|$\)"; }
safe_rm() { # never remove a tree that still has /dev or /proc mounted inside it
    mounted_under "$1" && die "$1 still has mounts inside; not removing it"
    rm -rf "$1"
}
host_mirror() { # the Debian mirror this host's apt uses (deb822 .sources or a one-line list)
    local m
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$m" ] || m=$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -1 || true)
    echo "$m"
}
if [ ! -f "$ROOT/.ready" ]; then
    start
    MIRROR=$(host_mirror)
    [ -n "$MIRROR" ] || die "no Debian mirror found in the host's apt sources"
    log "userland: debootstrap --arch=arm64 $SUITE from $MIRROR (emulated second stage; several minutes)"
    safe_rm "$ROOT.tmp"
    debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT.tmp" "$MIRROR" \
        >"$OUT/debootstrap.log" 2>&1 || {
        tail -30 "$OUT/debootstrap.log" >&2
        die "debootstrap failed (log: $OUT/debootstrap.log)"
    }
    chroot "$ROOT.tmp" /usr/bin/apt-get clean
    touch "$ROOT.tmp/.ready"
    safe_rm "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
    for old in "$CACHE"/root-*; do # userlands of other keys: no longer used
        [ "$old" = "$ROOT" ] || [ ! -d "$old" ] || safe_rm "$old"
    done
    timing "userland (debootstrap)"
fi

# ---- 3. mounts (undone on exit) -------------------------------------------------------------------
MOUNTED=()
cleanup() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" || true
    done
    MOUNTED=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM # so that the EXIT trap undoes the mounts
mnt() { # mnt TARGET mount-args...
    local target=$1
    shift
    [ -e "$target" ] || mkdir -p "$target"
    mount "$@" "$target"
    MOUNTED+=("$target")
}
mkdir -p "$CACHE/pip" "$CACHE/wheels"
mnt "$ROOT/proc" -t proc proc
mnt "$ROOT/dev" --bind /dev
mnt "$ROOT/sys" --bind /sys
mnt "$ROOT/cache" --bind "$CACHE"
mnt "$ROOT/out" --bind "$OUT"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# the registries may sit behind a TLS proxy that only the host's CA bundle trusts
mkdir -p "$ROOT/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-bundle.crt"

# A clean environment inside: the host's PIP_* settings and pip.conf point at host-only folders.
in_arm() { # in_arm CPU command...: QEMU_CPU reaches qemu through binfmt; children inherit it
    local cpu=$1
    shift
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH="/opt/venv-$cpu/bin:/usr/local/bin:/usr/bin:/bin" QEMU_CPU="$cpu" \
        PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_CACHE_DIR=/cache/pip PIP_CONFIG_FILE=/dev/null \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_NO_INPUT=1 \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$@"
}

# qemu 7.2 passes the host's x86 /proc/cpuinfo through: onnxruntime's cpuinfo library then segfaults
# at import, and gcc's -mcpu=native (ggml's native build) silently picks plain armv8-a. An ARM one,
# as the board's kernel writes it, fixes both.
cpuinfo() { # cpuinfo CPU > file
    local part var feat i
    case "$1" in
        cortex-a76) part=0xd0b var=0x4 feat="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        cortex-a72) part=0xd08 var=0x0 feat="fp asimd evtstrm crc32 cpuid" ;; # Pi 4: no crypto
        *) die "no /proc/cpuinfo table for $1 (known: cortex-a76, cortex-a72)" ;;
    esac
    for ((i = 0; i < $(nproc); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: 1\n\n' \
            "$i" "$feat" "$var" "$part"
    done
}

# ---- 4. the clone (tracked + untracked-not-ignored files: no .venv, build, *.so) ------------------
start
rm -rf "$ROOT/opt/src" && mkdir -p "$ROOT/opt/src"
(cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) \
    | tar -C "$REPO" --null -T - -cf - | tar -C "$ROOT/opt/src" -xf -
GCC_VERSION=$(in_arm "${CPUS%% *}" gcc -dumpfullversion)
timing "copy the clone"

FAILED=()
for CPU in $CPUS; do
    log "---- $CPU"
    cpuinfo "$CPU" >"$CACHE/cpuinfo-$CPU"
    mnt "$ROOT/proc/cpuinfo" --bind "$CACHE/cpuinfo-$CPU"
    in_arm "$CPU" uname -m | grep -qx aarch64 || die "the chroot does not run aarch64 programs"

    # -- the ggml-python wheel for this CPU, from its sdist (cached by version + flags + compiler + CPU).
    #    cross (default): compiled on the host by gcc-aarch64-linux-gnu for the flags ggml's native probe
    #    picks on that board; about 1 CPU-minute. emulated: `pip wheel` inside the chroot, ggml probing
    #    the emulated CPU, exactly as on a board; 30+ minutes per CPU on a 2-core host.
    if [ "$GGML_BUILD" = cross ]; then
        ARCH=${ARM_ARCH[$CPU]:-}
        [ -n "$ARCH" ] || die "no -march for $CPU (known: ${!ARM_ARCH[*]})"
        CMARGS="-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc"
        CMARGS+=" -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$ARCH $GGML_CMAKE_ARGS"
        COMPILER=$(aarch64-linux-gnu-g++ -dumpfullversion)
    else
        CMARGS=$GGML_CMAKE_ARGS
        COMPILER=$GCC_VERSION
    fi
    WKEY=ggml-$GGML_PY-$CPU-$GGML_BUILD-$(key "$GGML_PY" "$CMARGS" "$COMPILER" "$CPU" "$SCRIPT_VERSION")
    WHEELS=$CACHE/wheels/$WKEY
    if ! ls "$WHEELS"/ggml_python-*.whl >/dev/null 2>&1; then
        start
        log "ggml-python $GGML_PY from its sdist for $CPU ($GGML_BUILD build)"
        rm -rf "$WHEELS.tmp"
        # --no-cache-dir: pip's wheel cache is keyed by the sdist alone, not by CMAKE_ARGS
        if [ "$GGML_BUILD" = cross ]; then
            [ -x "$CACHE/xbuild/bin/pip" ] || python3 -m venv "$CACHE/xbuild"
            env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
                _PYTHON_HOST_PLATFORM=linux-aarch64 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="$CMARGS" \
                "$CACHE/xbuild/bin/pip" wheel -v --no-cache-dir --no-deps --no-binary ggml-python \
                -w "$WHEELS.tmp" "ggml-python==$GGML_PY" >"$OUT/ggml-build-$CPU.log" 2>&1
        else
            in_arm "$CPU" bash -c '[ -x /opt/build-venv/bin/python ] || python3 -m venv /opt/build-venv'
            in_arm "$CPU" env CMAKE_ARGS="$CMARGS" /opt/build-venv/bin/pip wheel -v --no-cache-dir --no-deps \
                -w "/cache/wheels/$WKEY.tmp" "ggml-python==$GGML_PY" >"$OUT/ggml-build-$CPU.log" 2>&1
        fi || {
            tail -40 "$OUT/ggml-build-$CPU.log" >&2
            die "ggml-python build failed for $CPU (log: $OUT/ggml-build-$CPU.log)"
        }
        ls "$WHEELS.tmp"/ggml_python-*-linux_aarch64.whl >/dev/null || die "no linux_aarch64 ggml wheel in $WHEELS.tmp"
        mv "$WHEELS.tmp" "$WHEELS"
        timing "ggml-python build ($CPU, $GGML_BUILD)"
        grep -E "ARM detected|Adding CPU backend variant" "$OUT/ggml-build-$CPU.log" | sort -u | head -3 || true
    fi

    # -- the venv: deps from PyPI (aarch64 wheels, pip's download cache), ggml from the wheel above, the
    #    project from the clone with `pip install .` (compiles runtime/language/kernels/*.c on this CPU). The venv is
    #    kept while what it holds stays the same (pyproject's dependency list, the ggml wheel, the test
    #    tools, the userland); the project itself is installed anew on every run.
    start
    VENV=/opt/venv-$CPU
    TEST_REQS=("pytest>=8" "hypothesis>=6" "setuptools>=74.1" "wheel")
    VKEY=$(key "$(sed -n '/^dependencies = \[/,/^\]/p' "$REPO/pyproject.toml")" "$WKEY" "${TEST_REQS[*]}" "$ROOT" "$SCRIPT_VERSION")
    if [ "$(cat "$ROOT$VENV/.key" 2>/dev/null)" != "$VKEY" ]; then
        rm -rf "$ROOT$VENV"
        in_arm "$CPU" python3 -m venv "$VENV"
        in_arm "$CPU" bash -c "pip install -q /cache/wheels/$WKEY/ggml_python-*.whl" >"$OUT/install-$CPU.log" 2>&1 \
            && in_arm "$CPU" pip install -q /opt/src >>"$OUT/install-$CPU.log" 2>&1 \
            && in_arm "$CPU" pip install -q "${TEST_REQS[@]}" >>"$OUT/install-$CPU.log" 2>&1 \
            && echo "$VKEY" >"$ROOT$VENV/.key"
    else # the dependencies are there: the project only (no build isolation: setuptools is in the venv)
        in_arm "$CPU" pip install -q --no-deps --no-build-isolation --force-reinstall /opt/src \
            >"$OUT/install-$CPU.log" 2>&1
    fi || {
        tail -40 "$OUT/install-$CPU.log" >&2
        die "install failed on $CPU (log: $OUT/install-$CPU.log)"
    }
    rm -rf "$ROOT/opt/src/build" # setuptools' build folder: not part of the tests
    in_arm "$CPU" python -c 'import sys, tinygptv_edge.runtime.pipeline, tinygptv_edge.runtime.language.decoder; assert "torch" not in sys.modules'
    timing "venv + pip install . ($CPU)"
    if [ "${1:-}" = --setup-only ]; then
        umount "$ROOT/proc/cpuinfo" && unset 'MOUNTED[${#MOUNTED[@]}-1]'
        continue
    fi

    # -- the torch-free tier. The pytest entry point, not `python -m pytest`: that would put the source
    #    root on sys.path, whose tinygptv_edge/ lacks the mapped runtime/ export/ calib/ packages.
    #    Two pytest processes side by side (two cores): the tests on the committed exports of the
    #    shipped model, which also write the measurements (tests/helpers/shipped_data.py, computed once for
    #    the tests) to measure-<cpu>.json at their end (tests/conftest.py), and all the others.
    start
    log "tests, measurements and demo on $CPU"
    SHIPPED="tests/runtime/test_shipped_exports.py tests/runtime/test_kv_snapshots.py"
    rm -f "$OUT/measure-$CPU.json"
    in_arm "$CPU" env TINYGPTV_MEASURE_OUT="/out/measure-$CPU.json" \
        bash -c "cd /opt/src && pytest -q -p no:cacheprovider $SHIPPED" >"$OUT/tests-shipped-$CPU.txt" 2>&1 &
    SHIPPED_PID=$!
    IGNORE=$(for f in $SHIPPED; do printf -- '--ignore=%s ' "$f"; done)
    if in_arm "$CPU" bash -c "cd /opt/src && pytest -q -p no:cacheprovider tests $IGNORE" \
        2>&1 | tee "$OUT/tests-$CPU.txt"; then :; else FAILED+=("tests on $CPU"); fi
    if wait "$SHIPPED_PID"; then tail -3 "$OUT/tests-shipped-$CPU.txt"; else
        cat "$OUT/tests-shipped-$CPU.txt" >&2
        FAILED+=("tests on the shipped exports on $CPU")
    fi
    if [ -s "$OUT/measure-$CPU.json" ]; then
        tail -30 "$OUT/measure-$CPU.json"
    else
        FAILED+=("measurements on $CPU (no $OUT/measure-$CPU.json)")
    fi
    # the demo answer: the CLI on the x86-made exports, against the PyTorch reference's golden answer
    if in_arm "$CPU" bash -c "cd /opt/src && tinygptv-edge run --json --vision tests/data/vision.int8.onnx \
        --language tests/data/language.q4_0.gguf --image export/data/example.png \
        --prompt \"\$(python tests/helpers/shipped_data.py --demo-question)\"" >"$OUT/run-$CPU.json" 2>"$OUT/run-$CPU.err" \
        && in_arm "$CPU" python /opt/src/tests/helpers/shipped_data.py --check-demo "/out/run-$CPU.json"; then
        cat "$OUT/run-$CPU.json"
    else
        cat "$OUT/run-$CPU.json" "$OUT/run-$CPU.err" >&2
        FAILED+=("demo answer on $CPU")
    fi
    timing "tests + measurements + demo ($CPU)"
    umount "$ROOT/proc/cpuinfo" && unset 'MOUNTED[${#MOUNTED[@]}-1]'
done

timing "total" "$T_START" "$C_START"
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) (emulated timings; not a board's speed)" \
    | tee -a "$OUT/timings.txt"
[ ${#FAILED[@]} = 0 ] || die "${FAILED[*]}"
echo "test-aarch64: passed on ${CPUS// /, } (results in $OUT)"
