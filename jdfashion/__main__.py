from jdfashion.cli import main

main()
