"""In CI (CI=true), a skipped test fails: CI installs every optional reference (transformers, the book's
package, the real tokenizer), so a skip there would hide a parity check that no longer runs."""
import os
import tempfile

import pytest

# torch.compile's on-disk cache does not tell kernels compiled under a forced ATEN_CPU_CAPABILITY
# from native ones (code compiled for AVX-512 and reused under avx2 fails): a forced run gets a
# cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.environ['ATEN_CPU_CAPABILITY']}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may skip: {report.longrepr}"

