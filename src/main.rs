fn main() {
    println!("headcni {}", headcni::VERSION);
}
