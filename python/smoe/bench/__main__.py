from smoe.bench.layer import main

main()
