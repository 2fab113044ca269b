from conv2dlstm.cli import main

raise SystemExit(main())
