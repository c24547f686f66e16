"""Build the native onnxruntime kernel library (libsparsec_ort.so) from source, cached.

The sources are in kernel/. The library uses only onnxruntime's C API through the function table
that onnxruntime hands to `RegisterCustomOps`, so it needs the C API header at build time and
nothing at link time. Headers are looked up in this order:

1. `ORT_INCLUDE_DIR` (a directory holding onnxruntime_c_api.h, or its include/ root);
2. system headers (/usr/include/onnxruntime, /usr/local/include/onnxruntime, ...);
3. Debian trixie's `libonnxruntime-dev`, fetched once with `apt-get download` into the cache using a
   private apt state directory (the system's apt configuration is not touched), then `dpkg-deb -x`.

`--sanitize` builds a library instrumented with AddressSanitizer and UBSan (for the fuzz tests).

The library lands in `$SPARSEC_CACHE_DIR/kernel/<key>/libsparsec_ort.so` (default cache:
`$XDG_CACHE_HOME/sparsec` or `~/.cache/sparsec`); the key hashes the sources, flags, compiler and
header, so any change rebuilds. Builds write a temporary file and rename it into place.

    python -m sparsec.runtime.build [--force] [--sanitize]
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparsec.runtime import BuildError  # defined there so that importing the package stays light

KERNEL_DIR = Path(__file__).parent / "kernel"
LIBRARY_NAME = "libsparsec_ort.so"
# -mtune=native schedules for the CPU the library is built on (it is built where it runs); the
# instruction sets stay per function (target attributes) and are chosen at run time. Single layer
# [128, 768] x [3072, 768]^T, 32x32 blocks: best 0.139-0.141 -> 0.132-0.137 ms.
FLAGS = ("-O3", "-mtune=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
         "-DORT_API_MANUAL_INIT")
# `--sanitize`: AddressSanitizer and UndefinedBehaviorSanitizer, every report fatal. The library is
# for tests (tests/test_kernel_sanitized.py): it runs only with the sanitizer runtime preloaded into
# the process (`sanitizer_preload`), and it is cached apart from the normal one.
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")
HEADER = "onnxruntime_c_api.h"
SYSTEM_INCLUDE_DIRS = (
    "/usr/include/onnxruntime",
    "/usr/local/include/onnxruntime",
    "/usr/include/onnxruntime/core/session",
    "/usr/local/include/onnxruntime/core/session",
    "/opt/homebrew/include/onnxruntime",
    "/usr/include",
    "/usr/local/include",
)
DEBIAN_SOURCE = "deb http://deb.debian.org/debian trixie main"
DEBIAN_PACKAGE = "libonnxruntime-dev"
APT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Headers:
    include_dir: Path
    origin: str  # "ORT_INCLUDE_DIR", "system" or "debian libonnxruntime-dev (fetched)"


@dataclass(frozen=True)
class BuildInfo:
    library: Path
    headers: Headers
    compiler: str
    built: bool  # False when the cached library was reused


def cache_dir() -> Path:
    if os.environ.get("SPARSEC_CACHE_DIR"):
        return Path(os.environ["SPARSEC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsec"


def sources() -> list[Path]:
    return sorted(p for p in KERNEL_DIR.iterdir() if p.suffix in (".cc", ".h"))


# ---------------------------------------------------------------------------------------------
# compiler and headers

def find_compiler() -> str:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)  # type: ignore[return-value]
    raise BuildError("no C++ compiler found (install g++ or set CXX)")


def _compiler_identity(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"compiler {cxx} does not run: {err}") from None
    return out.splitlines()[0].strip() if out else cxx


def _header_dir_in(root: Path) -> Path | None:
    for candidate in (root, root / "onnxruntime", root / "onnxruntime" / "core" / "session",
                      root / "include", root / "include" / "onnxruntime"):
        if (candidate / HEADER).is_file():
            return candidate
    return None


def find_headers(fetch: bool = True) -> Headers:
    user = os.environ.get("ORT_INCLUDE_DIR")
    if user:
        found = _header_dir_in(Path(user).expanduser())
        if found is None:
            raise BuildError(f"ORT_INCLUDE_DIR={user} holds no {HEADER}")
        return Headers(found, "ORT_INCLUDE_DIR")
    for d in SYSTEM_INCLUDE_DIRS:
        if (Path(d) / HEADER).is_file():
            return Headers(Path(d), "system")
    debian = cache_dir() / "headers" / DEBIAN_PACKAGE
    found = _header_dir_in(debian / "usr" / "include")
    if found is None and fetch:
        fetch_debian_headers(debian)
        found = _header_dir_in(debian / "usr" / "include")
    if found is None:
        raise BuildError(f"no onnxruntime headers: set ORT_INCLUDE_DIR or install {DEBIAN_PACKAGE}")
    return Headers(found, f"debian {DEBIAN_PACKAGE}")


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"no onnxruntime headers: `{cmd[0]}` failed: {err}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "dpkg-deb: error"))] or lines or ["(no output)"]
        raise BuildError(f"no onnxruntime headers: `{' '.join(cmd[:2])}` failed: {errors[0].strip()}")


def fetch_debian_headers(dest: Path) -> None:
    """Download Debian's libonnxruntime-dev with a private apt state and unpack it into `dest`."""
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt_get or not dpkg_deb:
        raise BuildError(f"no onnxruntime headers: set ORT_INCLUDE_DIR or install {DEBIAN_PACKAGE} "
                         "(no apt-get/dpkg-deb to fetch it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apt-", dir=dest.parent) as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(DEBIAN_SOURCE + "\n")
        options = [
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Etc::sourcelist={work / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "Debug::NoLocking=1",
        ]
        if os.geteuid() == 0:  # the _apt sandbox user cannot write into our private directory
            options += ["-o", "APT::Sandbox::User=root"]
        _run([apt_get, "update", "-q", *options])
        _run([apt_get, "download", "-q", *options, DEBIAN_PACKAGE], cwd=work)
        debs = sorted(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise BuildError(f"no onnxruntime headers: apt-get download produced no {DEBIAN_PACKAGE} .deb")
        unpacked = work / "root"
        _run([dpkg_deb, "-x", str(debs[-1]), str(unpacked)])
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(unpacked, dest)


# ---------------------------------------------------------------------------------------------
# build

def _cache_key(cxx_identity: str, headers: Headers, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for src in sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update("\0".join(flags).encode() + b"\0" + cxx_identity.encode() + b"\0")
    h.update((headers.include_dir / HEADER).read_bytes())
    return h.hexdigest()[:16]


def _first_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln:
            return ln
    return lines[0] if lines else "(no compiler output)"


def build(force: bool = False, sanitize: bool = False) -> BuildInfo:
    """Build (or reuse) the kernel library; raises BuildError with the reason when it cannot.
    `sanitize` builds the ASan/UBSan-instrumented library instead (see SANITIZE_FLAGS)."""
    cxx = find_compiler()
    identity = _compiler_identity(cxx)
    headers = find_headers()
    flags = FLAGS + SANITIZE_FLAGS if sanitize else FLAGS
    out_dir = cache_dir() / "kernel" / _cache_key(identity, headers, flags)
    library = out_dir / LIBRARY_NAME
    if library.is_file() and not force:
        return BuildInfo(library, headers, identity, built=False)

    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=LIBRARY_NAME + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [cxx, *flags, f"-I{headers.include_dir}", f"-I{KERNEL_DIR}",
           *(str(s) for s in sources() if s.suffix == ".cc"), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise BuildError(f"build error: {_first_error(proc.stderr + proc.stdout)}")
        os.replace(tmp, library)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"build error: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    info = {"compiler": identity, "command": cmd[:-1] + [str(library)],
            "headers": str(headers.include_dir), "headers_from": headers.origin}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return BuildInfo(library, headers, identity, built=True)


def sanitizer_preload() -> list[Path]:
    """The sanitizer runtimes a process must LD_PRELOAD to load the `sanitize` library."""
    cxx = find_compiler()
    found = []
    for name in ("libasan.so", "libubsan.so"):
        try:
            out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                                 timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            raise BuildError(f"compiler {cxx} does not run: {err}") from None
        if not out or not Path(out).is_file():
            raise BuildError(f"{cxx} has no {name} (install the compiler's sanitizer runtime)")
        found.append(Path(out).resolve())
    return found


def library_isa(library: Path, int8: bool = False, bf16_attention: bool = False) -> str:
    """The instruction set the library picks on this machine for fp32 compute, with `int8` for
    INT8 compute, with `bf16_attention` for bf16 attention ("amx" where the CPU has AMX tiles of
    that kind, "avx512_bf16" where it has AVX512-BF16 only, "avx512" where bf16 computes in fp32),
    loading it without onnxruntime."""
    lib = ctypes.CDLL(str(library))
    entry = lib.SparsecKernelIsaAttentionBf16 if bf16_attention else \
        lib.SparsecKernelIsaInt8 if int8 else lib.SparsecKernelIsa
    entry.restype = ctypes.c_char_p
    return entry().decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsec.runtime.build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached library exists")
    parser.add_argument("--sanitize", action="store_true",
                        help="build the ASan/UBSan-instrumented library (tests; load it with the sanitizer "
                             "runtimes in LD_PRELOAD)")
    args = parser.parse_args(argv)
    try:
        info = build(force=args.force, sanitize=args.sanitize)
    except BuildError as err:
        print(f"sparsec kernel: not built: {err}")
        return 1
    state = "built" if info.built else "cached"
    print(f"sparsec kernel: {state} {info.library}")
    print(f"  headers: {info.headers.include_dir} ({info.headers.origin})")
    print(f"  compiler: {info.compiler}")
    if args.sanitize:
        print(f"  load with: LD_PRELOAD={':'.join(str(p) for p in sanitizer_preload())} "
              f"ASAN_OPTIONS=detect_leaks=0 SPARSEC_KERNEL_LIB={info.library}")
    else:
        print(f"  isa on this machine: {library_isa(info.library)} (INT8 compute: "
              f"{library_isa(info.library, int8=True)}, bf16 attention: "
              f"{library_isa(info.library, bf16_attention=True)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
