from consult.ops.cli import main

raise SystemExit(main())
