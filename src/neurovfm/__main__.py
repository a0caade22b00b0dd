from neurovfm.cli import main

raise SystemExit(main())
