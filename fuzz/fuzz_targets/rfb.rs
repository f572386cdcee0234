//! isola-display's VNC server (RFB 3.3/3.7/3.8 handshake and every client message: pixel
//! format, encodings, update requests, key and pointer events, cut text), fed a byte stream
//! as a VNC client would send it, on a Unix socket the real accept loop serves. Each input
//! is one connection; the next starts once the server has closed it and let its client go.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use isola_display::framebuffer::Display;
use isola_display::input::InputSink;
use libfuzzer_sys::fuzz_target;

struct Server {
    path: std::path::PathBuf,
    display: Arc<Display>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        isola_fuzz::init();
        let dir = std::env::temp_dir().join(format!("isola-fuzz-rfb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let path = dir.join("vnc.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let display = Arc::new(Display::new(64, 48));
        let served = Arc::clone(&display);
        std::thread::spawn(move || {
            isola_display::vnc::serve_unix(listener, served, Arc::new(InputSink::new(None)))
        });
        Server { path, display }
    })
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let mut stream = UnixStream::connect(&server.path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let reader = {
        let mut stream = stream.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut sink = [0u8; 8192];
            loop {
                match stream.read(&mut sink) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                    Err(_) => return false,
                }
            }
        })
    };
    let _ = stream.write_all(data);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let closed = reader.join().expect("reader does not panic");
    assert!(
        closed,
        "the server did not close a connection whose client had finished"
    );
    // The client's threads finish after they close the socket: wait for its slot to go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.display.lock().vnc_clients() > 0 {
        assert!(
            Instant::now() < deadline,
            "a finished VNC client is still registered"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
});
