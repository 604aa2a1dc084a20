"""``python -m tinyclip_fast [args]`` runs tinyclip-distill; ``python -m tinyclip_fast demo``
runs the built-in demo (tinyclip_fast.demo.run)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "demo":
    from tinyclip_fast.demo.run import main as demo_main

    sys.exit(demo_main(sys.argv[2:]))

from tinyclip_fast.cli import main  # noqa: E402

sys.exit(main())
