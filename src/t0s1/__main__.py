from t0s1.cli import main

main()
