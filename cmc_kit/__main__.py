from cmc_kit.cli import main

raise SystemExit(main())
