from ps3d.cli import app

if __name__ == "__main__":
    app()
