from ducho_fast.cli import main

main()
