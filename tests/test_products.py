"""Product writing when the disk is full: a clear error, nothing partial, nothing lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WRITE_UNDER_A_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from onboard.runtime.errors import ProductWriteError
    from onboard.runtime.products import write_geotiff
    # A file-size limit makes the kernel refuse writes past it, as a full disk does.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    noise = np.random.default_rng(0).integers(0, 65535, (4, 256, 256), dtype=np.uint16)
    try:
        write_geotiff(sys.argv[1], noise, ["blue", "green", "red", "nir"], None)
    except ProductWriteError as error:
        print("ERROR", error)
        sys.exit(3)
""")


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_product(tmp_path):
    target = tmp_path / "product.tif"
    target.write_bytes(b"previous product")
    script = tmp_path / "write.py"
    script.write_text(WRITE_UNDER_A_SIZE_LIMIT)
    result = subprocess.run([sys.executable, str(script), str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "product.tif: cannot write product" in result.stdout
    assert target.read_bytes() == b"previous product"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["product.tif", "write.py"]
