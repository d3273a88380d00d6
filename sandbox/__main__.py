from sandbox.cli.entry import main

main()
