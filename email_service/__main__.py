from email_service.cli import main

raise SystemExit(main())
