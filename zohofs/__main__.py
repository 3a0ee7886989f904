from zohofs.cli import main

raise SystemExit(main())
