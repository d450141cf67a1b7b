from drlora_kernels.cli import main

raise SystemExit(main())
