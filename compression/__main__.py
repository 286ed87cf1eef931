from compression.cli.main import main

raise SystemExit(main())
