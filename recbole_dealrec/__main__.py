from recbole_dealrec.quick_start import main

if __name__ == "__main__":
    main()
