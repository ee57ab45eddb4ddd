from multiscale_dali.cli.main import main

main()
