from ovis_server.cli import main

main()
