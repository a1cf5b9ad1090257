"""A same-user process that takes the rendezvous of a key before the real
uploader and serves something else, for the sharing tests:

    python rogue_server.py DIR MODE SIZE DIGEST_HEX

It takes the lock and binds the socket of the one key whose files are in DIR
(a real uploader made them and exited), prints "ready", and answers every
connection until it reads "exit" on stdin. MODE: "zeros" hands over stand-in
device memory of SIZE bytes holding zeros with the right offer (size and
content digest), as a process that knows the protocol could; "silent"
accepts connections and never answers; "full" never accepts, and fills its
queue of connections itself; "foreign" answers in another protocol version
(another magic), with a descriptor.
"""

import fcntl
import glob
import os
import socket
import struct
import sys
import threading

from common import wait_for_exit


def main():
    share_dir, mode, size, digest = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
    (lock_path,) = glob.glob(os.path.join(share_dir, "*.lock"))
    sock_path = lock_path[: -len(".lock")] + ".sock"
    lock = open(lock_path, "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(0 if mode == "full" else 16)
    # The stand-in imports memfds of this name as device memory of device 0.
    memory = os.memfd_create("fakecuda-vmm:dev=0:types=1")
    os.ftruncate(memory, size)
    held = []

    def serve():
        while True:
            conn, _ = server.accept()
            if mode in ("zeros", "foreign"):
                magic = b"RZCSHR03" if mode == "zeros" else b"RZCSHR99"
                socket.send_fds(conn, [magic + struct.pack("<Q", size) + digest], [memory])
                conn.close()
            else:
                held.append(conn)  # never answered

    if mode == "full":
        while True:  # connect until the queue refuses more
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(sock_path)
            except BlockingIOError:
                c.close()
                break
            held.append(c)
    else:
        threading.Thread(target=serve, daemon=True).start()
    print("ready", flush=True)
    wait_for_exit()
    lock.close()


if __name__ == "__main__":
    main()
