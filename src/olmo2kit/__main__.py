from olmo2kit.cli.app import main

main()
