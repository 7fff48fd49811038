from deid_router.cli import main

raise SystemExit(main())
