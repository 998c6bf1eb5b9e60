"""Offline name lists for the PhoneBook: common given names and surnames (no download).

211 × 210 gives 44,310 distinct "First Last" keys — about half a million answer tokens of
phone numbers, past the paper's largest book (256k tokens).
"""

FIRST_NAMES = (
    "Aaron", "Abigail", "Adam", "Adrian", "Aiden", "Alan", "Albert", "Alexander", "Alice",
    "Allison", "Amanda", "Amber", "Amelia", "Amy", "Andrea", "Andrew", "Angela", "Anna", "Anthony",
    "Arthur", "Ashley", "Austin", "Barbara", "Benjamin", "Beth", "Betty", "Beverly", "Billy",
    "Bobby", "Brandon", "Brenda", "Brian", "Brittany", "Bruce", "Bryan", "Caleb", "Cameron",
    "Carl", "Carol", "Caroline", "Catherine", "Charles", "Charlotte", "Cheryl", "Chloe",
    "Christian", "Christina", "Christine", "Christopher", "Cynthia", "Daniel", "Danielle", "David",
    "Deborah", "Debra", "Denise", "Dennis", "Diana", "Diane", "Donald", "Donna", "Doris",
    "Dorothy", "Douglas", "Dylan", "Edward", "Elijah", "Elizabeth", "Ella", "Emily", "Emma",
    "Eric", "Ethan", "Eugene", "Evelyn", "Frances", "Frank", "Gabriel", "Gary", "George", "Gerald",
    "Gloria", "Grace", "Gregory", "Hannah", "Harold", "Harry", "Heather", "Helen", "Henry",
    "Isaac", "Isabella", "Jack", "Jacob", "Jacqueline", "James", "Janet", "Janice", "Jason",
    "Jean", "Jeffrey", "Jennifer", "Jeremy", "Jerry", "Jesse", "Jessica", "Joan", "Joe", "John",
    "Jonathan", "Jordan", "Jose", "Joseph", "Joshua", "Joyce", "Judith", "Judy", "Julia", "Julie",
    "Justin", "Karen", "Katherine", "Kathleen", "Kathryn", "Keith", "Kelly", "Kenneth", "Kevin",
    "Kimberly", "Kyle", "Larry", "Laura", "Lauren", "Lawrence", "Leah", "Liam", "Lily", "Linda",
    "Lisa", "Logan", "Lucas", "Madison", "Margaret", "Maria", "Marie", "Marilyn", "Mark", "Martha",
    "Mary", "Mason", "Matthew", "Megan", "Melissa", "Mia", "Michael", "Michelle", "Nancy",
    "Natalie", "Nathan", "Nicholas", "Nicole", "Noah", "Olivia", "Owen", "Pamela", "Patricia",
    "Patrick", "Paul", "Peter", "Philip", "Rachel", "Ralph", "Randy", "Raymond", "Rebecca",
    "Richard", "Robert", "Roger", "Ronald", "Rose", "Roy", "Russell", "Ruth", "Ryan", "Samantha",
    "Samuel", "Sandra", "Sara", "Sarah", "Scott", "Sean", "Sharon", "Shirley", "Sophia",
    "Stephanie", "Stephen", "Steven", "Susan", "Teresa", "Terry", "Theresa", "Thomas", "Timothy",
    "Tyler", "Victoria", "Vincent", "Virginia", "Walter", "Wayne", "William", "Zachary",
)

LAST_NAMES = (
    "Adams", "Alexander", "Allen", "Alvarez", "Anderson", "Bailey", "Baker", "Barnes", "Bell",
    "Bennett", "Black", "Boyd", "Brooks", "Brown", "Bryant", "Burns", "Butler", "Campbell",
    "Carter", "Castillo", "Castro", "Chavez", "Chen", "Clark", "Coleman", "Collins", "Cook",
    "Cooper", "Cox", "Crawford", "Cruz", "Daniels", "Davis", "Diaz", "Dixon", "Edwards", "Ellis",
    "Evans", "Ferguson", "Fisher", "Flores", "Ford", "Foster", "Freeman", "Garcia", "Gibson",
    "Gomez", "Gonzales", "Gonzalez", "Gordon", "Graham", "Grant", "Gray", "Green", "Griffin",
    "Gutierrez", "Hall", "Hamilton", "Harris", "Harrison", "Hayes", "Henderson", "Hernandez",
    "Herrera", "Hill", "Holmes", "Howard", "Hughes", "Hunt", "Jackson", "James", "Jenkins",
    "Jimenez", "Johnson", "Jones", "Jordan", "Kelly", "Kennedy", "Kim", "King", "Lee", "Lewis",
    "Long", "Lopez", "Marshall", "Martin", "Martinez", "Mason", "Mcdonald", "Medina", "Mendoza",
    "Meyer", "Miller", "Mills", "Mitchell", "Moore", "Morales", "Moreno", "Morgan", "Morris",
    "Murphy", "Murray", "Myers", "Nelson", "Nguyen", "Ortiz", "Owens", "Palmer", "Parker", "Patel",
    "Patterson", "Perez", "Perry", "Peterson", "Phillips", "Powell", "Price", "Ramirez", "Ramos",
    "Reed", "Reyes", "Reynolds", "Richardson", "Rivera", "Roberts", "Robertson", "Robinson",
    "Rodriguez", "Rogers", "Romero", "Ross", "Ruiz", "Russell", "Sanchez", "Sanders", "Schmidt",
    "Scott", "Shaw", "Simmons", "Simpson", "Smith", "Snyder", "Stevens", "Stewart", "Stone",
    "Sullivan", "Taylor", "Thomas", "Thompson", "Torres", "Tran", "Tucker", "Turner", "Vargas",
    "Wagner", "Walker", "Wallace", "Ward", "Warren", "Washington", "Watson", "Webb", "Wells",
    "West", "White", "Williams", "Wilson", "Wood", "Woods", "Wright", "Young", "Abbott", "Barker",
    "Becker", "Bishop", "Bradley", "Burke", "Carlson", "Chambers", "Chapman", "Cole", "Curtis",
    "Dunn", "Elliott", "Fleming", "Fowler", "Francis", "Fuller", "Gardner", "Hansen", "Harper",
    "Hart", "Hawkins", "Hoffman", "Hudson", "Jensen", "Knight", "Lambert", "Lane", "Lawson",
    "Little", "Lynch", "Mann", "Marsh", "Newman", "Norris", "Obrien", "Olson", "Page", "Pearson",
)
