from convcli.cli.app import main

main()
