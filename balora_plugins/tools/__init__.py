"""Programs built on the library: the ``balora`` command, the demo, the benchmark, reports, bundled assets.

The library (``config``, ``functional``, ``core``, the trainer doors) never imports this package; the tools
use only the library's public names (``tests/test_layout.py`` holds both rules).
"""
