from olmo2kit.cli import main

main()
