from multiscale_dali.cli import main

main()
