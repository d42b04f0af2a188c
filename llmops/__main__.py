from llmops.cli.app import main

main()
