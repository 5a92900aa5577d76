from cora.cli import main

raise SystemExit(main())
