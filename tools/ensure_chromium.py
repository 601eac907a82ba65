"""Make sure headless Chromium is available for the report's browser test.

Installs the Debian packages ``chromium`` and ``chromium-driver`` with ``apt-get`` when they are
missing and that is possible here (running as root, ``apt-get`` present). It prints what it did
and always exits 0: the browser test itself fails under ``CI=true`` when Chromium is absent, so
this helper never breaks the build on its own (e.g. on macOS or without root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

PACKAGES = ("chromium", "chromium-driver")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    env = os.environ.get("EMOLENS_CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _apt(args: list[str]) -> int:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("ensure_chromium: $ apt-get " + " ".join(args), flush=True)
    try:
        return subprocess.run(["apt-get", *args], env=env, timeout=1800).returncode
    except (OSError, subprocess.TimeoutExpired) as e:  # never fail the build from here
        print(f"ensure_chromium: apt-get failed to run: {e}")
        return 1


def main() -> int:
    have_browser = find_chromium()
    have_driver = shutil.which("chromedriver")
    if have_browser and have_driver:
        print(f"ensure_chromium: found {have_browser} and {have_driver}; nothing to do.")
        return 0
    missing = [p for p, ok in zip(PACKAGES, (have_browser, have_driver)) if not ok]
    if not shutil.which("apt-get"):
        print(f"ensure_chromium: {', '.join(missing)} missing and apt-get is not available; install Chromium "
              "yourself (or set EMOLENS_CHROMIUM) to run the browser test.")
        return 0
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        print(f"ensure_chromium: {', '.join(missing)} missing; not root, so not installing. Run "
              f"`sudo apt-get install -y {' '.join(PACKAGES)}` to run the browser test.")
        return 0
    install = ["install", "-y", "--no-install-recommends", *PACKAGES]
    if _apt(install) != 0:
        # Package lists may be stale or absent on a fresh machine.
        _apt(["update"])
        _apt(install)
    if find_chromium() and shutil.which("chromedriver"):
        print(f"ensure_chromium: installed {' '.join(PACKAGES)} ({find_chromium()}).")
    else:
        print("ensure_chromium: could not install Chromium; the browser test will skip locally and fail under CI=true.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
