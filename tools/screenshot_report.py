"""Render a run's report.html with headless Chromium to a PNG, to look at it as a reader would.

Usage: python tools/screenshot_report.py RUN_DIR/report/report.html [OUT.png] [--width PX]
[--height PX]

Needs Debian's ``chromium`` (``apt-get install chromium``); the test suite does not. The page is
opened from the file system with every host name resolving to nothing, so anything it would
fetch from the network shows up as missing in the picture.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("tools/screenshot_report.py: chromium not found (apt-get install chromium)",
              file=sys.stderr)
        return 1
    out = (args.out or args.page.with_suffix(".png")).resolve()
    out.unlink(missing_ok=True)  # an old picture must not pass for a new one
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                   "--host-resolver-rules=MAP * ~NOTFOUND",
                   f"--window-size={args.width},{args.height}", f"--screenshot={out}",
                   args.page.resolve().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                  check=False)
        except subprocess.TimeoutExpired:
            print("tools/screenshot_report.py: chromium did not finish in 120 s", file=sys.stderr)
            return 1
    if done.returncode != 0 or not out.is_file():
        print(done.stderr[-2000:], file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
